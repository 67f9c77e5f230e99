//! The local control socket: how `flynode status` (and later `keys rotate`) talk to a
//! running daemon. A Unix stream socket, mode 0600 in a 0700 directory, and the daemon
//! also checks the peer's uid, so only root (the daemon's own user) gets an answer.
//! One request per connection, one JSON line each way: easy to drive with `socat` too.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};

pub use crate::mesh::{PeerInfo, RotationStatus};

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Make a new key current now; keep the old one for the grace period.
    RotateKey,
    /// How far the rotation has got.
    Rotation,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Rotation(RotationStatus),
    Error { message: String },
}

/// What `flynode status` shows. Never holds a secret.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub version: String,
    pub node_id: String,
    pub region: String,
    pub public_key: String,
    pub public_key_fingerprint: String,
    /// Seconds since the current key was made (generated or rotated in); `None` when
    /// the key directory cannot tell.
    #[serde(default)]
    pub key_age_secs: Option<u64>,
    pub uptime_secs: u64,
    pub routing: RoutingStatus,
    pub xdp: XdpStatus,
    pub mesh: MeshStatus,
    #[serde(default)]
    pub forwarding: crate::forward::engine::ForwardStatus,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeshStatus {
    /// The TUN device.
    pub interface: String,
    pub mtu: u16,
    pub listen_port: u16,
    pub rotation: RotationStatus,
    /// Peers by state, over all of them (the metrics may list fewer one by one).
    #[serde(default)]
    pub peer_summary: crate::mesh::PeerSummary,
    pub peers: Vec<PeerInfo>,
    /// Datagrams and packets dropped, by reason (never logged one by one).
    pub drops: BTreeMap<String, u64>,
    /// Driver counters: TUN and UDP packets, forwarding queue, I/O errors.
    pub counters: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoutingStatus {
    pub source: String,
    pub nodes: usize,
    pub services: usize,
    /// (address, port) pairs in the XDP services map.
    pub service_endpoints: usize,
    /// How many routing maps have been applied since start (1 = the initial one).
    #[serde(default)]
    pub generation: u64,
    /// When the current map was applied (seconds since the Unix epoch).
    #[serde(default)]
    pub applied_unix: u64,
    /// The control-plane source's state: "file", "connected", "disconnected: <why>"
    /// (etcd unreachable: forwarding continues on the last good map).
    #[serde(default)]
    pub state: String,
    /// etcd: the revision the applied map was read at.
    #[serde(default)]
    pub revision: Option<i64>,
    /// etcd: whether the source is connected and watching (file: always true).
    #[serde(default)]
    pub connected: bool,
    /// Records rejected by validation (etcd key or file, with the error); the rest of
    /// the map applies without them.
    #[serde(default)]
    pub rejected: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct XdpStatus {
    pub interface: String,
    pub mode: String,
    /// How selected datagrams reach flynode ("af_xdp (copy mode, 1 queue(s))", or
    /// "socket (reason)").
    pub backend: String,
    /// Ingress counters (datagrams through AF_XDP and through sockets, ...).
    pub ingress: BTreeMap<String, u64>,
    /// Service endpoints whose socket could not be opened, with the error.
    pub socket_failures: BTreeMap<String, String>,
    /// Datagrams received per service id (until forwarding consumes them).
    pub services: BTreeMap<String, ServiceTraffic>,
    /// Every counter slot by name, summed over CPUs.
    pub counters: BTreeMap<String, u64>,
    /// Totals per verdict (userspace, pass, drop).
    pub verdicts: BTreeMap<String, u64>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceTraffic {
    pub datagrams: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach the flynode daemon at {path}: {source} (is `flynode run` running, and are you root?)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon at {path} sent an answer this flynode cannot read: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("another flynode daemon already answers on {0}")]
    InUse(PathBuf),
    #[error(
        "control socket directory {path} is unsafe: {problem}; another user could put \
         their own socket in our socket's place"
    )]
    UnsafeDir { path: PathBuf, problem: String },
}

/// Sends one request and waits (bounded) for the answer.
pub fn request(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = StdUnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(|e| ControlError::Protocol {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ControlError::Protocol {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// Asks for the daemon's status.
pub fn status(path: &Path) -> Result<Status, ControlError> {
    match request(path, &Request::Status)? {
        Response::Status(status) => Ok(*status),
        Response::Error { message } => Err(ControlError::Refused(message)),
        Response::Rotation(_) => Err(ControlError::Protocol {
            path: path.to_owned(),
            detail: "expected a status, got a rotation answer".into(),
        }),
    }
}

/// Whether a daemon accepts connections on `path`.
pub fn daemon_answers(path: &Path) -> bool {
    StdUnixStream::connect(path).is_ok()
}

/// Asks the daemon to rotate its key.
pub fn rotate_key(path: &Path) -> Result<RotationStatus, ControlError> {
    rotation_request(path, &Request::RotateKey)
}

/// Asks how far the rotation has got.
pub fn rotation(path: &Path) -> Result<RotationStatus, ControlError> {
    rotation_request(path, &Request::Rotation)
}

fn rotation_request(path: &Path, req: &Request) -> Result<RotationStatus, ControlError> {
    match request(path, req)? {
        Response::Rotation(r) => Ok(r),
        Response::Error { message } => Err(ControlError::Refused(message)),
        Response::Status(_) => Err(ControlError::Protocol {
            path: path.to_owned(),
            detail: "expected a rotation answer, got a status".into(),
        }),
    }
}

/// The longest request the daemon reads: every request is one short JSON line.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// The listening side, owned by the daemon. Removes its socket file when dropped.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Binds the socket, replacing a stale file left by a daemon that crashed, but never
    /// one that a live daemon still answers on.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let io = |source| ControlError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
            check_socket_dir(dir)?;
        }
        if path.exists() {
            if daemon_answers(path) {
                return Err(ControlError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Serves requests forever; `answer` computes the response to each.
    pub async fn serve<F>(&self, answer: F)
    where
        F: Fn(Request) -> Response + Send + Sync + Clone + 'static,
    {
        // SAFETY: geteuid has no preconditions.
        let own_uid = unsafe { libc::geteuid() };
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, own_uid, answer).await {
                    tracing::debug!(error = %e, "control connection ended with an error");
                }
            });
        }
    }
}

async fn serve_one<F>(mut stream: UnixStream, own_uid: u32, answer: F) -> std::io::Result<()>
where
    F: Fn(Request) -> Response,
{
    let peer_uid = stream.peer_cred()?.uid();
    let response = if peer_uid != own_uid && peer_uid != 0 {
        Response::Error {
            message: format!("uid {peer_uid} may not use the control socket (root only)"),
        }
    } else {
        let mut line = String::new();
        // Bounded in time so a client that never finishes its line cannot pin a task
        // forever, and in size so one that never sends a newline cannot fill our memory.
        let mut reader = TokioBufReader::new((&mut stream).take(MAX_REQUEST_BYTES + 1));
        match tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await {
            Ok(Ok(n)) if n as u64 > MAX_REQUEST_BYTES => Response::Error {
                message: format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            },
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Ok(request) => answer(request),
                Err(e) => Response::Error {
                    message: format!("unreadable request: {e}"),
                },
            },
            Ok(Err(e)) => return Err(e),
            Err(_) => Response::Error {
                message: "request not received within 5 s".into(),
            },
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Refuses a socket directory that someone else could swap our socket in: one owned by
/// another user, or writable by group or others. (The socket itself is 0600, so only
/// its name is at stake; an existing directory is checked, not silently fixed.)
fn check_socket_dir(dir: &Path) -> Result<(), ControlError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir).map_err(|source| ControlError::Io {
        path: dir.to_owned(),
        source,
    })?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    let problem = if meta.uid() != euid {
        format!("it belongs to uid {}, not {euid}", meta.uid())
    } else if mode & 0o022 != 0 {
        format!(
            "it has mode {mode:04o}, writable by group or others (`chmod 700 {}`)",
            dir.display()
        )
    } else {
        return Ok(());
    };
    Err(ControlError::UnsafeDir {
        path: dir.to_owned(),
        problem,
    })
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_are_one_json_object_each() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"request":"status"}"#
        );
        let err = Response::Error {
            message: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"result":"error","message":"x"}"#
        );
    }

    #[tokio::test]
    async fn a_second_server_on_a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl/control.sock");
        let server = ControlServer::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            ControlServer::bind(&path),
            Err(ControlError::InUse(_))
        ));
        drop(server);
        assert!(!path.exists(), "a stopped server removes its socket");
        // A crashed daemon leaves its socket file behind with nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let replaced = ControlServer::bind(&path);
        assert!(replaced.is_ok(), "{:?}", replaced.err());
    }

    #[tokio::test]
    async fn a_request_without_end_is_cut_off_at_the_limit_not_buffered() {
        use tokio::io::AsyncWriteExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let server = ControlServer::bind(&path).unwrap();
        tokio::spawn(async move {
            server
                .serve(|_| Response::Error {
                    message: "served".into(),
                })
                .await
        });
        let mut client = UnixStream::connect(&path).await.unwrap();
        // Ten times the limit and no newline: the daemon must answer (and stop reading)
        // once it has the limit, not buffer it all.
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0u64;
        let mut answer = Vec::new();
        let (mut rd, mut wr) = client.split();
        let writer = async {
            while sent < 10 * MAX_REQUEST_BYTES {
                if wr.write_all(&chunk).await.is_err() {
                    break; // the daemon closed its side: it stopped reading
                }
                sent += chunk.len() as u64;
            }
        };
        let reader = tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut answer);
        let (_, read) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(writer, reader)
        })
        .await
        .expect("the daemon answers an oversized request");
        // The daemon closes with our excess unread, which resets the connection after
        // its answer: an error at the end of the read is expected.
        let _ = read;
        let text = String::from_utf8(answer).unwrap();
        assert!(text.contains("request longer than 65536 bytes"), "{text}");
        assert!(!text.contains("served"), "{text}");
    }

    #[tokio::test]
    async fn a_socket_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("run");
        std::fs::create_dir(&sub).unwrap();
        for (mode, ok) in [(0o777, false), (0o770, false), (0o755, true), (0o700, true)] {
            std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = ControlServer::bind(&sub.join("control.sock"));
            match got {
                Ok(server) => {
                    assert!(ok, "{mode:o} accepted");
                    drop(server);
                }
                Err(e) => {
                    assert!(!ok, "{mode:o}: {e}");
                    assert!(matches!(e, ControlError::UnsafeDir { .. }), "{e}");
                    assert!(e.to_string().contains(&format!("{mode:04o}")), "{e}");
                }
            }
        }
    }

    #[tokio::test]
    async fn status_round_trips_through_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let server = ControlServer::bind(&path).unwrap();
        let status = Status {
            version: "v".into(),
            node_id: "n".into(),
            region: "r".into(),
            public_key: "k".into(),
            public_key_fingerprint: "f".into(),
            key_age_secs: Some(86_400),
            uptime_secs: 3,
            routing: RoutingStatus {
                source: "file".into(),
                nodes: 1,
                services: 2,
                service_endpoints: 3,
                generation: 1,
                applied_unix: 0,
                state: "file".into(),
                revision: None,
                connected: true,
                rejected: BTreeMap::new(),
            },
            xdp: XdpStatus {
                interface: "eth0".into(),
                mode: "native".into(),
                backend: "af_xdp (copy mode, 1 queue(s))".into(),
                ingress: BTreeMap::new(),
                socket_failures: BTreeMap::new(),
                services: BTreeMap::new(),
                counters: BTreeMap::from([("pass_not_ip".into(), 7)]),
                verdicts: BTreeMap::from([("pass".into(), 7)]),
            },
            mesh: MeshStatus {
                interface: "flynode0".into(),
                mtu: 1420,
                listen_port: 51820,
                rotation: RotationStatus {
                    current: "k".into(),
                    previous: None,
                    moved: 0,
                    total: 0,
                    grace_left_secs: None,
                },
                peer_summary: Default::default(),
                peers: vec![],
                drops: BTreeMap::from([("malformed".into(), 1)]),
                counters: BTreeMap::new(),
            },
            forwarding: Default::default(),
        };
        let served = status.clone();
        tokio::spawn(async move {
            server
                .serve(move |_| Response::Status(Box::new(served.clone())))
                .await
        });
        let got = tokio::task::spawn_blocking(move || super::status(&path))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, status);
    }
}
