use std::fs::{self, Permissions};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

use super::*;
use crate::state::unix_now;
use crate::test_util::{entry_names as names, mode_of};

/// A fresh key directory inside a temp dir (kept alive by the returned guard).
fn keydir() -> (tempfile::TempDir, KeyDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = KeyDir::create(tmp.path().join("keys")).unwrap();
    (tmp, dir)
}

#[test]
fn create_makes_the_directory_and_missing_parents_with_mode_0700() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("var/lib/flynode/keys");
    let dir = KeyDir::create(&path).unwrap();
    assert_eq!(dir.path(), path);
    assert_eq!(mode_of(&path), 0o700);
    assert_eq!(mode_of(&tmp.path().join("var/lib/flynode")), 0o700);
}

#[test]
fn create_accepts_an_existing_0700_directory_and_keeps_its_keys() {
    let (_tmp, dir) = keydir();
    let public = dir.generate(false).unwrap();
    let again = KeyDir::create(dir.path()).unwrap();
    assert_eq!(again.load_current().unwrap().public_key(), public);
}

#[test]
fn an_existing_directory_open_to_group_or_others_is_refused_not_fixed() {
    for mode in [0o750, 0o701, 0o755, 0o770] {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("keys");
        fs::create_dir(&path).unwrap();
        fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
        for result in [KeyDir::create(&path), KeyDir::open(&path)] {
            let err = result.unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, KeyError::InsecureDir { mode: m, .. } if m == mode),
                "{msg}"
            );
            assert!(
                msg.contains(&format!("chmod 700 {}", path.display())),
                "{msg}"
            );
        }
        assert_eq!(mode_of(&path), mode, "must not be changed silently");
    }
}

#[test]
fn open_requires_an_existing_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("keys");
    let err = KeyDir::open(&missing).unwrap_err();
    assert!(matches!(err, KeyError::DirMissing { .. }), "{err}");
    assert!(err.to_string().contains(&missing.display().to_string()));
    assert!(!missing.exists(), "open must not create it");

    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        KeyDir::open(&file),
        Err(KeyError::NotADirectory { .. })
    ));
    assert!(matches!(
        KeyDir::create(&file),
        Err(KeyError::NotADirectory { .. })
    ));
}

#[test]
fn generate_writes_a_0600_key_file_in_wg_genkey_format() {
    let (_tmp, dir) = keydir();
    let public = dir.generate(false).unwrap();
    let path = dir.private_key_path();
    assert_eq!(path, dir.path().join("private.key"));
    assert_eq!(mode_of(&path), 0o600);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), 45);
    assert!(text.ends_with("=\n"), "{text:?}");
    assert_eq!(PrivateKey::from_base64(&text).unwrap().public_key(), public);
    assert_eq!(dir.load_current().unwrap().public_key(), public);
    assert_eq!(names(dir.path()), ["private.key", "state.json"]);
}

#[test]
fn generate_refuses_to_replace_an_existing_key_without_force() {
    let (_tmp, dir) = keydir();
    let first = dir.generate(false).unwrap();
    let before = fs::read(dir.private_key_path()).unwrap();

    let err = dir.generate(false).unwrap_err();

    let msg = err.to_string();
    assert!(matches!(err, KeyError::KeyExists { .. }), "{msg}");
    assert!(msg.contains("--force") && msg.contains("peers"), "{msg}");
    assert!(msg.contains("private.key"), "{msg}");
    assert_eq!(fs::read(dir.private_key_path()).unwrap(), before);
    assert_eq!(dir.load_current().unwrap().public_key(), first);
}

#[test]
fn generate_with_force_replaces_the_key_and_bumps_the_generation() {
    let (_tmp, dir) = keydir();
    let first = dir.generate(false).unwrap();
    assert_eq!(dir.state().unwrap().generation, 1);

    let second = dir.generate(true).unwrap();

    assert_ne!(first, second);
    assert_eq!(dir.load_current().unwrap().public_key(), second);
    let state = dir.state().unwrap();
    assert_eq!(state.generation, 2);
    assert_eq!(state.current.unwrap().public_key, second);
    assert_eq!(mode_of(&dir.private_key_path()), 0o600);
}

#[test]
fn generate_with_force_replaces_a_corrupt_or_insecure_key() {
    let (_tmp, dir) = keydir();
    fs::write(dir.private_key_path(), b"garbage").unwrap();
    fs::set_permissions(dir.private_key_path(), Permissions::from_mode(0o644)).unwrap();
    assert!(dir.load_current().is_err());

    let public = dir.generate(true).unwrap();

    assert_eq!(dir.load_current().unwrap().public_key(), public);
    assert_eq!(mode_of(&dir.private_key_path()), 0o600);
}

#[test]
fn generate_records_the_public_key_and_creation_time() {
    let (_tmp, dir) = keydir();
    let start = unix_now();
    let public = dir.generate(false).unwrap();
    let state = dir.state().unwrap();
    let current = state.current.unwrap();
    assert_eq!(current.public_key, public);
    assert!((start..=unix_now()).contains(&current.created_at));
    assert_eq!(state.previous, None);
}

#[test]
fn the_state_file_holds_public_keys_but_no_private_key_material() {
    let (_tmp, dir) = keydir();
    dir.generate(false).unwrap();
    dir.rotate().unwrap();
    let text = fs::read_to_string(dir.state_path()).unwrap();
    let current = dir.load_current().unwrap();
    let previous = dir.load_previous().unwrap().unwrap();
    for key in [&current, &previous] {
        assert!(text.contains(&key.public_key().to_base64()), "{text}");
        assert!(!text.contains(key.to_base64().as_str()), "{text}");
    }
    assert_eq!(mode_of(&dir.state_path()), 0o600);
}

#[test]
fn loading_without_a_key_says_how_to_create_one() {
    let (_tmp, dir) = keydir();
    let err = dir.load_current().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, KeyError::NoCurrentKey { .. }), "{msg}");
    assert!(
        msg.contains("private.key") && msg.contains("generate"),
        "{msg}"
    );
    assert!(dir.load_previous().unwrap().is_none());
}

#[test]
fn a_group_readable_key_is_refused_with_the_chmod_600_fix() {
    let (_tmp, dir) = keydir();
    dir.generate(false).unwrap();
    let path = dir.private_key_path();
    fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();

    let msg = dir.load_current().unwrap_err().to_string();

    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("0640"), "{msg}");
    assert!(
        msg.contains(&format!("chmod 600 {}", path.display())),
        "{msg}"
    );
}

#[test]
fn an_other_readable_previous_key_is_refused_too() {
    let (_tmp, dir) = keydir();
    dir.generate(false).unwrap();
    dir.rotate().unwrap();
    fs::set_permissions(dir.previous_key_path(), Permissions::from_mode(0o604)).unwrap();
    let msg = dir.load_previous().unwrap_err().to_string();
    assert!(
        msg.contains("previous.key") && msg.contains("chmod 600"),
        "{msg}"
    );
}

#[test]
fn rotate_requires_a_current_key() {
    let (_tmp, dir) = keydir();
    let err = dir.rotate().unwrap_err();
    assert!(matches!(err, KeyError::NoCurrentKey { .. }), "{err}");
    assert_eq!(names(dir.path()), Vec::<String>::new());
}

#[test]
fn rotate_keeps_the_old_key_as_previous_with_timestamps() {
    let (_tmp, dir) = keydir();
    let first = dir.generate(false).unwrap();
    let first_created = dir.state().unwrap().current.unwrap().created_at;
    let first_bytes = dir.load_current().unwrap().to_bytes();

    let rotation = dir.rotate().unwrap();

    assert_eq!(rotation.old, first);
    assert_ne!(rotation.new, first);
    assert_eq!(rotation.generation, 2);
    assert_eq!(rotation.wiped, None);
    assert_eq!(dir.load_current().unwrap().public_key(), rotation.new);
    let previous = dir.load_previous().unwrap().unwrap();
    assert_eq!(
        *previous.to_bytes(),
        *first_bytes,
        "the old key itself, unchanged"
    );
    assert_eq!(mode_of(&dir.previous_key_path()), 0o600);
    assert_eq!(mode_of(&dir.private_key_path()), 0o600);

    let state = dir.state().unwrap();
    assert_eq!(state.generation, 2);
    let current = state.current.unwrap();
    assert_eq!(current.public_key, rotation.new);
    assert_eq!(current.created_at, rotation.rotated_at);
    let prev = state.previous.unwrap();
    assert_eq!(prev.public_key, first);
    assert_eq!(prev.created_at, first_created);
    assert_eq!(prev.rotated_at, rotation.rotated_at);
    assert!(rotation.rotated_at >= first_created);
    assert_eq!(
        names(dir.path()),
        ["previous.key", "private.key", "state.json"]
    );
}

#[test]
fn rotating_during_a_grace_period_replaces_and_wipes_the_oldest_key() {
    let (_tmp, dir) = keydir();
    let k1 = dir.generate(false).unwrap();
    let r1 = dir.rotate().unwrap();

    let r2 = dir.rotate().unwrap();

    assert_eq!(r2.old, r1.new);
    assert_eq!(r2.wiped, Some(k1));
    assert_eq!(r2.generation, 3);
    assert_eq!(dir.load_previous().unwrap().unwrap().public_key(), r1.new);
    assert_eq!(dir.load_current().unwrap().public_key(), r2.new);
    let state = dir.state().unwrap();
    assert_eq!(state.previous.unwrap().public_key, r1.new);
    assert_eq!(
        names(dir.path()),
        ["previous.key", "private.key", "state.json"]
    );
}

#[test]
fn wipe_previous_removes_the_previous_key_and_its_state() {
    let (_tmp, dir) = keydir();
    dir.generate(false).unwrap();
    let rotation = dir.rotate().unwrap();

    assert_eq!(dir.wipe_previous().unwrap(), Some(rotation.old));

    assert!(!dir.previous_key_path().exists());
    assert!(dir.load_previous().unwrap().is_none());
    let state = dir.state().unwrap();
    assert_eq!(state.previous, None);
    assert_eq!(state.current.unwrap().public_key, rotation.new);
    assert_eq!(state.generation, 2);
    let recorded = fs::read_to_string(dir.state_path()).unwrap();
    assert!(!recorded.contains(&rotation.old.to_base64()), "{recorded}");
    assert_eq!(names(dir.path()), ["private.key", "state.json"]);
}

#[test]
fn wipe_previous_without_a_previous_key_changes_nothing() {
    let (_tmp, dir) = keydir();
    assert_eq!(dir.wipe_previous().unwrap(), None);
    let public = dir.generate(false).unwrap();
    assert_eq!(dir.wipe_previous().unwrap(), None);
    assert_eq!(dir.load_current().unwrap().public_key(), public);
}

#[test]
fn wipe_previous_removes_even_an_unreadable_previous_key() {
    let (_tmp, dir) = keydir();
    dir.generate(false).unwrap();
    dir.rotate().unwrap();
    fs::write(dir.previous_key_path(), b"corrupt").unwrap();
    assert!(dir.load_previous().is_err());

    assert_eq!(dir.wipe_previous().unwrap(), None);

    assert!(!dir.previous_key_path().exists());
    assert_eq!(dir.state().unwrap().previous, None);
}

#[test]
fn state_of_an_empty_directory_has_no_keys() {
    let (_tmp, dir) = keydir();
    let state = dir.state().unwrap();
    assert_eq!(state.generation, 0);
    assert_eq!(state.current, None);
    assert_eq!(state.previous, None);
}

#[test]
fn a_key_installed_with_wg_genkey_is_used_and_dated_by_its_file() {
    let (_tmp, dir) = keydir();
    let key = PrivateKey::generate();
    write_atomic(dir.private_key_path(), &key.to_file_contents(), 0o600).unwrap();
    let mtime = fs::metadata(dir.private_key_path()).unwrap().mtime();

    let state = dir.state().unwrap();

    assert_eq!(state.generation, 1);
    let current = state.current.unwrap();
    assert_eq!(current.public_key, key.public_key());
    assert_eq!(current.created_at, u64::try_from(mtime).unwrap());
    let rotation = dir.rotate().unwrap();
    assert_eq!(rotation.old, key.public_key());
}

#[test]
fn state_repairs_a_rotation_interrupted_before_the_state_file_was_written() {
    let (_tmp, dir) = keydir();
    let old = dir.generate(false).unwrap();
    let old_created = dir.state().unwrap().current.unwrap().created_at;
    // What rotate() leaves behind if it dies between writing private.key and state.json.
    fs::copy(dir.private_key_path(), dir.previous_key_path()).unwrap();
    let new = PrivateKey::generate();
    write_atomic(dir.private_key_path(), &new.to_file_contents(), 0o600).unwrap();

    let state = dir.state().unwrap();

    assert_eq!(state.generation, 2);
    assert_eq!(state.current.unwrap().public_key, new.public_key());
    let prev = state.previous.unwrap();
    assert_eq!(prev.public_key, old);
    assert_eq!(prev.created_at, old_created);
    assert_eq!(dir.wipe_previous().unwrap(), Some(old));
}

#[test]
fn rotate_after_a_crash_that_left_a_copy_of_the_current_key_wipes_nothing_real() {
    let (_tmp, dir) = keydir();
    let current = dir.generate(false).unwrap();
    // rotate() died right after writing previous.key.
    fs::copy(dir.private_key_path(), dir.previous_key_path()).unwrap();

    let rotation = dir.rotate().unwrap();

    assert_eq!(rotation.old, current);
    assert_eq!(rotation.wiped, None);
    assert_eq!(dir.load_previous().unwrap().unwrap().public_key(), current);
}

#[test]
fn a_deleted_state_file_is_rebuilt_from_the_key_files() {
    let (_tmp, dir) = keydir();
    dir.generate(false).unwrap();
    let rotation = dir.rotate().unwrap();
    fs::remove_file(dir.state_path()).unwrap();

    let state = dir.state().unwrap();

    assert_eq!(state.current.unwrap().public_key, rotation.new);
    assert_eq!(state.previous.unwrap().public_key, rotation.old);
    let again = dir.rotate().unwrap();
    assert_eq!(again.old, rotation.new);
    assert_eq!(again.wiped, Some(rotation.old));
}

#[test]
fn concurrent_rotations_are_serialised() {
    let (_tmp, dir) = keydir();
    let first = dir.generate(false).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || (0..5).map(|_| dir.rotate().unwrap()).collect::<Vec<_>>())
        })
        .collect();
    let mut rotations: Vec<Rotation> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    rotations.sort_by_key(|r| r.generation);

    let generations: Vec<u64> = rotations.iter().map(|r| r.generation).collect();
    assert_eq!(generations, (2..=21).collect::<Vec<_>>());
    // Each rotation retired exactly the key the one before it created.
    let mut expected_old = first;
    for r in &rotations {
        assert_eq!(r.old, expected_old);
        expected_old = r.new;
    }
    assert_eq!(dir.load_current().unwrap().public_key(), expected_old);
    assert_eq!(
        names(dir.path()),
        ["previous.key", "private.key", "state.json"]
    );
}

/// Another user's uid for ownership tests; `None` (the test is skipped, saying so) when
/// this process cannot chown, i.e. is not root. CI runs the tests as root.
fn other_uid() -> Option<u32> {
    if crate::ownership::euid() == 0 {
        Some(65534)
    } else {
        eprintln!("skipped: chown to another user needs root");
        None
    }
}

#[test]
fn a_key_file_owned_by_another_user_is_refused_even_at_0600() {
    let Some(uid) = other_uid() else { return };
    let (_tmp, dir) = keydir();
    dir.generate(false).unwrap();
    let path = dir.private_key_path();
    std::os::unix::fs::chown(&path, Some(uid), None).unwrap();
    assert_eq!(mode_of(&path), 0o600);
    let err = dir.load_current().unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, KeyError::ForeignOwner { owner, what: "private key file", .. } if owner == uid),
        "{msg}"
    );
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("uid 65534"), "{msg}");
}

#[test]
fn a_key_directory_owned_by_another_user_is_refused_even_at_0700() {
    let Some(uid) = other_uid() else { return };
    let (_tmp, dir) = keydir();
    std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
    let err = KeyDir::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            KeyError::ForeignOwner {
                what: "key directory",
                ..
            }
        ),
        "{err}"
    );
    // An ancestor owned by another user can swap the directory just the same.
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("theirs/keys");
    KeyDir::create(&keys).unwrap();
    std::os::unix::fs::chown(tmp.path().join("theirs"), Some(uid), None).unwrap();
    let err = KeyDir::open(&keys).unwrap_err();
    assert!(
        matches!(&err, KeyError::UnsafeAncestor { ancestor, .. } if ancestor.ends_with("theirs")),
        "{err}"
    );
}

#[test]
fn a_hard_linked_key_file_is_refused() {
    let (tmp, dir) = keydir();
    dir.generate(false).unwrap();
    let other = tmp.path().join("copy.key");
    fs::hard_link(dir.private_key_path(), &other).unwrap();
    let err = dir.load_current().unwrap_err();
    assert!(
        matches!(err, KeyError::HardLinked { links: 2, .. }),
        "{err}"
    );
    fs::remove_file(&other).unwrap();
    assert!(dir.load_current().is_ok(), "one name again: accepted");
}

#[test]
fn a_symlinked_key_directory_is_refused_not_followed() {
    let (tmp, dir) = keydir();
    dir.generate(false).unwrap();
    let link = tmp.path().join("keys-link");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    for result in [KeyDir::open(&link), KeyDir::create(&link)] {
        let err = result.unwrap_err();
        assert!(matches!(err, KeyError::SymlinkedDir { .. }), "{err}");
        assert!(err.to_string().contains("keys-link"), "{err}");
    }
}

#[test]
fn a_key_directory_under_a_world_writable_parent_needs_the_sticky_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("shared");
    let keys = parent.join("keys");
    KeyDir::create(&keys).unwrap();
    for (mode, safe) in [
        (0o777, false),
        (0o775, false),
        (0o1777, true),
        (0o755, true),
    ] {
        fs::set_permissions(&parent, Permissions::from_mode(mode)).unwrap();
        let got = KeyDir::open(&keys);
        if safe {
            assert!(got.is_ok(), "{mode:o}: {:?}", got.err());
            continue;
        }
        let err = got.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, KeyError::UnsafeAncestor { ancestor, .. } if *ancestor == fs::canonicalize(&parent).unwrap()),
            "{mode:o}: {msg}"
        );
        assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
    }
}
