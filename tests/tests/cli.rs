//! The `flynode` command as an operator meets it: exit codes and one-line errors.
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};

use flynode_tests::node::flynode_bin;

fn flynode(args: &[&str]) -> Output {
    Command::new(flynode_bin())
        .args(args)
        .output()
        .expect("run flynode")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The interface does not exist: a `run` that got past its early checks could attach
/// nothing in the host namespace.
fn write_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("flynode.toml");
    std::fs::write(
        &path,
        format!(
            "region = \"test\"\nnode_id = \"n1\"\nmesh_address = \"fd00:f1::1\"\n\
             key_dir = \"{d}/keys\"\ncontrol_socket = \"{d}/control.sock\"\n\
             [xdp]\ninterface = \"fly-absent0\"\n{extra}",
            d = dir.display()
        ),
    )
    .unwrap();
    path
}

/// `flynode keys generate` into `dir/keys`, which must succeed; returns that path.
fn generate_keys(dir: &std::path::Path) -> std::path::PathBuf {
    let keys = dir.join("keys");
    let out = flynode(&["keys", "generate", "--key-dir", keys.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    keys
}

#[test]
fn version_prints_name_and_version() {
    let out = flynode(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("flynode {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_reports_file_line_column_and_field_and_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "mode = \"fast\"\n");
    let out = flynode(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}:8:8: xdp.mode: unknown variant `fast`",
            path.display()
        )),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn check_config_validates_the_routing_file_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let routing = dir.path().join("routing.toml");
    std::fs::write(&routing, "[[service]]\nid = 0\n").unwrap();
    let path = write_config(
        dir.path(),
        &format!("[source]\nfile = \"{}\"\n", routing.display()),
    );
    let out = flynode(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("routing.toml:2:"), "{}", stderr(&out));

    std::fs::write(&routing, "").unwrap();
    let out = flynode(&["check-config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn keys_generate_never_overwrites_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let keys = keys.to_str().unwrap();
    let first = flynode(&["keys", "generate", "--key-dir", keys]);
    assert!(first.status.success(), "{}", stderr(&first));
    let again = flynode(&["keys", "generate", "--key-dir", keys]);
    assert_eq!(again.status.code(), Some(4));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    let shown = flynode(&["keys", "show", "--key-dir", keys]);
    assert!(
        String::from_utf8_lossy(&shown.stdout)
            .contains(String::from_utf8_lossy(&first.stdout).trim())
    );
    let forced = flynode(&["keys", "generate", "--key-dir", keys, "--force"]);
    assert!(forced.status.success());
    assert_ne!(forced.stdout, first.stdout, "--force makes a new key");
}

#[test]
fn keys_show_prints_the_private_key_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let keys = generate_keys(dir.path());
    let keys = keys.to_str().unwrap();
    let private = std::fs::read_to_string(dir.path().join("keys/private.key")).unwrap();
    let plain = flynode(&["keys", "show", "--key-dir", keys]);
    assert!(!String::from_utf8_lossy(&plain.stdout).contains(private.trim()));
    let explicit = flynode(&["keys", "show", "--key-dir", keys, "--private"]);
    assert!(String::from_utf8_lossy(&explicit.stdout).contains(private.trim()));
}

#[test]
fn keys_pubkey_prints_what_wg_pubkey_prints() {
    let Ok(genkey) = Command::new("wg").arg("genkey").output() else {
        assert!(
            std::env::var_os("FLYNODE_REQUIRE_WG").is_none(),
            "wg (wireguard-tools) is required but missing"
        );
        eprintln!("WARNING: wg not installed; skipping the wg pubkey comparison");
        return;
    };
    let wg_pub = |private: &[u8]| {
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(private).unwrap();
        child.wait_with_output().unwrap().stdout
    };
    let mut ours = Command::new(flynode_bin())
        .args(["keys", "pubkey"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    ours.stdin
        .take()
        .unwrap()
        .write_all(&genkey.stdout)
        .unwrap();
    let ours = ours.wait_with_output().unwrap();
    assert!(ours.status.success());
    assert_eq!(ours.stdout, wg_pub(&genkey.stdout));
}

#[test]
fn keys_rotate_keeps_the_previous_key_and_prints_the_new_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let k = keys.to_str().unwrap();
    let first = flynode(&["keys", "generate", "--key-dir", k]);
    let rotated = flynode(&["keys", "rotate", "--key-dir", k]);
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    assert_ne!(rotated.stdout, first.stdout);
    let shown =
        String::from_utf8_lossy(&flynode(&["keys", "show", "--key-dir", k]).stdout).into_owned();
    let first = String::from_utf8_lossy(&first.stdout);
    assert!(
        shown.contains(&format!("previous  {}", first.trim())),
        "{shown}"
    );
    let mode = std::fs::metadata(keys.join("previous.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn run_refuses_a_key_that_others_can_read_and_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    let keys = generate_keys(dir.path());
    let key = keys.join("private.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(dir.path().join("routing.toml"), "").unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[source]\nfile = \"{}/routing.toml\"\n",
            dir.path().display()
        ),
    );
    let out = flynode(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("chmod 600 {}", key.display())),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_config_accepts_the_etcd_source_without_touching_etcd() {
    // `run` with etcd is exercised in namespaces by tests/tests/fleet.rs; never here,
    // where it would attach to the host's own interface.
    let dir = tempfile::tempdir().unwrap();
    generate_keys(dir.path());
    let config = write_config(
        dir.path(),
        "[source.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"5s\"\n",
    );
    let out = flynode(&["check-config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("routing map from etcd"),
        "{out:?}"
    );
    let bad = write_config(
        dir.path(),
        "[source.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"1s\"\n",
    );
    let out = flynode(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("lease_ttl: must be a whole number of seconds, at least 2 s"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn status_without_a_daemon_exits_5() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = flynode(&["status", "--socket", sock.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot reach the flynode daemon"));
}
