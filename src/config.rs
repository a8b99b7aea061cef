//! One `Config` for the whole library: defaults, then `CELLNET_*`
//! environment variables, then CLI flags (applied by the binary).
//!
//! Every variable is listed in [`VARIABLES`]; the README's table and
//! `cellnet --help` are made from the same list.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::launch::LaunchMode;
use crate::place::PlacementPolicy;
use crate::proto::{
    discovery::DiscoveryConfig, global::GlobalConfig, liveness::LivenessConfig,
    reliable::ReliableConfig,
};

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{var}={value:?}: {reason}")]
pub struct ConfigError {
    /// The variable (or flag) that holds the value, e.g. `CELLNET_WINDOW`.
    pub var: &'static str,
    /// The value as given.
    pub value: String,
    /// Why it cannot be used.
    pub reason: String,
}

/// `(variable, default, meaning)` of every setting.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    (
        "CELLNET_LAUNCH",
        "auto",
        "where identity comes from: auto, mpi, slurm, explicit, single",
    ),
    (
        "CELLNET_RANK / _SIZE / _NODE / _NODE_INDEX / _LOCAL_RANK / _LOCAL_SIZE / _NODES",
        "-",
        "explicit identity (launch mode explicit)",
    ),
    (
        "CELLNET_JOB_KEY",
        "from MPI/Slurm",
        "separates jobs sharing a node and a discovery port",
    ),
    (
        "CELLNET_SECRET",
        "derived from the job key",
        "key of the HMAC tag on discovery datagrams",
    ),
    (
        "CELLNET_PLACEMENT",
        "compact",
        "core binding: compact, scatter, none (keep the launcher's binding)",
    ),
    (
        "CELLNET_THREADS",
        "0 (= PUs bound)",
        "rayon workers that run the cell handler",
    ),
    (
        "CELLNET_DISCOVERY_PORT",
        "47400",
        "UDP port of node-local discovery beacons",
    ),
    (
        "CELLNET_BROADCAST",
        "127.255.255.255",
        "node-local broadcast address for beacons",
    ),
    (
        "CELLNET_COORDINATOR",
        "first node of the job, port 47401",
        "host:port where node leaders register",
    ),
    (
        "CELLNET_BIND_IP",
        "127.0.0.1 on one node, else the host's address",
        "IP of the ZeroMQ tcp:// receiving socket",
    ),
    (
        "CELLNET_IPC_DIR",
        "/tmp",
        "directory of ipc:// sockets for same-node peers; 'none' disables ipc",
    ),
    (
        "CELLNET_JOIN_TIMEOUT",
        "60s",
        "give up when the job is not globally ready by then",
    ),
    (
        "CELLNET_SEND_DEADLINE",
        "30s",
        "a cell unanswered this long resolves as timed out",
    ),
    (
        "CELLNET_RETRANSMIT",
        "200ms",
        "first retransmission timeout (doubles up to CELLNET_RETRANSMIT_MAX)",
    ),
    (
        "CELLNET_RETRANSMIT_MAX",
        "2s",
        "retransmission timeout ceiling",
    ),
    (
        "CELLNET_WINDOW",
        "4096",
        "unanswered cells in flight per peer before send blocks (1-16384)",
    ),
    (
        "CELLNET_WINDOW_BYTES",
        "16MiB",
        "unanswered payload bytes per peer before send blocks (a larger cell goes alone); B, KiB, MiB, GiB",
    ),
    (
        "CELLNET_SPIN",
        "50us",
        "how long an idle I/O thread (once the job is ready) or a waiting ticket polls before sleeping (0: sleep at once)",
    ),
    (
        "CELLNET_FRAMES_AHEAD",
        "64",
        "frames buffered ahead of the one the application waits for",
    ),
    (
        "CELLNET_REPLAY_FRAMES",
        "2",
        "latest frames of cells kept per peer and sent again when it restarts (0: none)",
    ),
    (
        "CELLNET_HEARTBEAT / _SUSPECT_AFTER / _DEAD_AFTER",
        "500ms / 2s / 5s",
        "failure detection: heartbeat to a quiet watched peer; silent this long: suspect, then dead \
         (also a node-mate silent in the discovery handshake)",
    ),
    (
        "CELLNET_FAULT_DELAY / _JITTER / _DUP",
        "off",
        "test faults: hold each ZeroMQ message sent for DELAY ± JITTER, send a DUP fraction twice",
    ),
    (
        "CELLNET_LINGER",
        "2s",
        "after a drained shutdown, how long to answer peers that have not said goodbye",
    ),
    (
        "CELLNET_MALLOC_TUNE",
        "1",
        "1: keep freed memory for reuse (glibc mmap/trim thresholds) so large cells do not page-fault in; 0: leave malloc alone",
    ),
    ("CELLNET_LOG", "warn", "log filter (debug, cellnet=trace, ...)"),
];

/// Every setting of cellnet; [`Config::default`] gives the documented
/// defaults of [`VARIABLES`], [`Config::from_env`] applies `CELLNET_*`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where this instance's identity comes from (`CELLNET_LAUNCH`).
    pub launch: LaunchMode,
    /// How the node's instances are bound to cores (`CELLNET_PLACEMENT`).
    pub placement: PlacementPolicy,
    /// Rayon workers; 0 = one per PU of the binding.
    pub threads: usize,
    /// UDP port of the node-local discovery beacons; 0 = any free port (a
    /// one-instance job only, since node-mates must share it).
    pub discovery_port: u16,
    /// Node-local broadcast address the beacons go to.
    pub broadcast: Ipv4Addr,
    /// `host:port` of the coordinator; `None` = derived from the launch.
    pub coordinator: Option<String>,
    /// Port of the coordinator when its address is derived from the launch.
    pub coordinator_port: u16,
    /// `None` = 127.0.0.1 on one node, else the address of the hostname.
    pub bind_ip: Option<std::net::IpAddr>,
    /// `None` disables ipc:// between same-node peers.
    pub ipc_dir: Option<PathBuf>,
    /// Key of the HMAC tag on datagrams; `None` = derived from the job key.
    pub secret: Option<Vec<u8>>,
    /// Give up starting when the job is not globally ready by then.
    pub join_timeout: Duration,
    /// Frames buffered ahead of the one the application waits for (at least 1).
    pub frames_ahead: u64,
    /// After a drained shutdown, how long to keep answering peers that have
    /// not said goodbye yet.
    pub linger: Duration,
    /// Timing of the node-local discovery handshake.
    pub discovery: DiscoveryConfig,
    /// Timing of the global join.
    pub global: GlobalConfig,
    /// Timing of failure detection.
    pub liveness: LivenessConfig,
    /// Tuning of the reliable channel (retransmission, deadline, window).
    pub reliable: ReliableConfig,
    /// Payload bytes unanswered per peer before a send waits, besides the
    /// count `reliable.window` (a larger message goes when none is out).
    pub window_bytes: u64,
    /// How long the I/O thread keeps polling after its last work (once the
    /// job is globally ready; not during start-up), and a
    /// ticket keeps checking for its answer, before going to sleep: waking
    /// a sleeping thread on an idle core costs tens of microseconds.
    pub spin: Duration,
    /// Tune glibc's malloc for large cells when a communicator starts
    /// ([`crate::runtime::tune_malloc`]).
    pub malloc_tune: bool,
    /// Injected wire faults (tests); `None` in production.
    pub faults: Option<crate::runtime::faults::FaultConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            launch: LaunchMode::Auto,
            placement: PlacementPolicy::Compact,
            threads: 0,
            discovery_port: 47_400,
            broadcast: Ipv4Addr::new(127, 255, 255, 255),
            coordinator: None,
            coordinator_port: 47_401,
            bind_ip: None,
            ipc_dir: Some(std::env::temp_dir()),
            secret: None,
            join_timeout: Duration::from_secs(60),
            frames_ahead: 64,
            linger: Duration::from_secs(2),
            discovery: DiscoveryConfig::default(),
            global: GlobalConfig::default(),
            liveness: LivenessConfig::default(),
            reliable: ReliableConfig::default(),
            window_bytes: 16 << 20,
            spin: Duration::from_micros(50),
            malloc_tune: true,
            faults: None,
        }
    }
}

/// `v`, unless it is zero.
fn nonzero<T: Default + PartialEq>(v: T) -> Result<T, String> {
    if v == T::default() {
        Err("must be at least 1".into())
    } else {
        Ok(v)
    }
}

/// Parse a size in bytes: `4096`, `512B`, `64KiB`, `16MiB`, `1GiB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, scale) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .into_iter()
    .find_map(|(unit, scale)| s.strip_suffix(unit).map(|n| (n, scale)))
    .unwrap_or((s, 1));
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size in bytes (e.g. 16MiB): {s:?}"))?;
    n.checked_mul(scale)
        .ok_or_else(|| format!("too large: {s:?}"))
}

/// Parse a duration: `50us`, `250ms`, `2s`, `1.5s`, `3m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| "not a duration (try 50us, 250ms, 2s, 1m)".to_string())?;
    if !v.is_finite() || v < 0.0 || v * scale > 1e9 {
        return Err("duration out of range".into());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

impl Config {
    /// Defaults overridden by the `CELLNET_*` variables of the process.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// Defaults overridden by the `CELLNET_*` entries of `vars`.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut c = Config::default();
        fn get<T>(
            vars: &HashMap<String, String>,
            var: &'static str,
            parse: impl FnOnce(&str) -> Result<T, String>,
        ) -> Result<Option<T>, ConfigError> {
            match vars.get(var) {
                None => Ok(None),
                Some(value) => parse(value).map(Some).map_err(|reason| ConfigError {
                    var,
                    value: value.clone(),
                    reason,
                }),
            }
        }
        fn from_str<T: FromStr>(s: &str) -> Result<T, String>
        where
            T::Err: std::fmt::Display,
        {
            s.trim().parse::<T>().map_err(|e| e.to_string())
        }
        if let Some(v) = get(vars, "CELLNET_LAUNCH", from_str)? {
            c.launch = v;
        }
        if let Some(v) = get(vars, "CELLNET_PLACEMENT", from_str)? {
            c.placement = v;
        }
        if let Some(v) = get(vars, "CELLNET_THREADS", from_str)? {
            c.threads = v;
        }
        if let Some(v) = get(vars, "CELLNET_DISCOVERY_PORT", from_str)? {
            c.discovery_port = v;
        }
        if let Some(v) = get(vars, "CELLNET_BROADCAST", from_str)? {
            c.broadcast = v;
        }
        if let Some(v) = get(vars, "CELLNET_COORDINATOR", |s| {
            if s.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                Ok(s.trim().to_string())
            } else {
                Err("expected host:port".into())
            }
        })? {
            c.coordinator = Some(v);
        }
        if let Some(v) = get(vars, "CELLNET_BIND_IP", from_str)? {
            c.bind_ip = Some(v);
        }
        if let Some(v) = get(vars, "CELLNET_IPC_DIR", |s| Ok(s.to_string()))? {
            c.ipc_dir = (v != "none").then(|| PathBuf::from(v));
        }
        if let Some(v) = get(vars, "CELLNET_SECRET", |s| Ok(s.as_bytes().to_vec()))? {
            c.secret = Some(v);
        }
        if let Some(v) = get(vars, "CELLNET_JOIN_TIMEOUT", parse_duration)? {
            c.join_timeout = v;
        }
        if let Some(v) = get(vars, "CELLNET_SEND_DEADLINE", parse_duration)? {
            c.reliable.deadline = v;
        }
        if let Some(v) = get(vars, "CELLNET_RETRANSMIT", parse_duration)? {
            c.reliable.retransmit.initial = v;
        }
        if let Some(v) = get(vars, "CELLNET_RETRANSMIT_MAX", parse_duration)? {
            c.reliable.retransmit.ceiling = v;
        }
        if let Some(v) = get(vars, "CELLNET_WINDOW", |s| {
            // More in flight than the receiver tracks for duplicates could
            // never be used: the channel holds a message back until the
            // span of unanswered ids fits that.
            let most = ReliableConfig::default().dedup_window;
            from_str::<u32>(s).and_then(nonzero).and_then(|w| {
                if u64::from(w) > most {
                    Err(format!(
                        "at most {most} (the ids a receiver tracks for duplicates)"
                    ))
                } else {
                    Ok(w)
                }
            })
        })? {
            c.reliable.window = v;
        }
        if let Some(v) = get(vars, "CELLNET_REPLAY_FRAMES", from_str::<u64>)? {
            c.reliable.replay_frames = v;
        }
        if let Some(v) = get(vars, "CELLNET_HEARTBEAT", parse_duration)? {
            c.liveness.heartbeat = v;
        }
        if let Some(v) = get(vars, "CELLNET_SUSPECT_AFTER", parse_duration)? {
            c.liveness.suspect_after = v;
        }
        if let Some(v) = get(vars, "CELLNET_DEAD_AFTER", parse_duration)? {
            c.liveness.dead_after = v;
        }
        let delay = get(vars, "CELLNET_FAULT_DELAY", parse_duration)?;
        let jitter = get(vars, "CELLNET_FAULT_JITTER", parse_duration)?;
        let dup = get(vars, "CELLNET_FAULT_DUP", |s| {
            from_str::<f64>(s).and_then(|p| {
                if (0.0..1.0).contains(&p) {
                    Ok(p)
                } else {
                    Err("must be a probability in [0, 1)".into())
                }
            })
        })?;
        if delay.is_some() || jitter.is_some() || dup.is_some() {
            let delay = delay.unwrap_or_default();
            let jitter = jitter.unwrap_or_default();
            if jitter > delay {
                return Err(ConfigError {
                    var: "CELLNET_FAULT_JITTER",
                    value: format!("{jitter:?}"),
                    reason: format!("must not exceed CELLNET_FAULT_DELAY ({delay:?})"),
                });
            }
            c.faults = Some(crate::runtime::faults::FaultConfig {
                delay,
                jitter,
                dup: dup.unwrap_or(0.0),
            });
        }
        if let Some(v) = get(vars, "CELLNET_WINDOW_BYTES", |s| {
            parse_bytes(s).and_then(nonzero)
        })? {
            c.window_bytes = v;
        }
        if let Some(v) = get(vars, "CELLNET_SPIN", parse_duration)? {
            if v > Duration::from_millis(10) {
                return Err(ConfigError {
                    var: "CELLNET_SPIN",
                    value: format!("{v:?}"),
                    reason: "at most 10ms (it burns a core while nothing happens)".into(),
                });
            }
            c.spin = v;
        }
        if let Some(v) = get(vars, "CELLNET_MALLOC_TUNE", |s| match s.trim() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err("must be 1 or 0".into()),
        })? {
            c.malloc_tune = v;
        }
        if let Some(v) = get(vars, "CELLNET_LINGER", parse_duration)? {
            c.linger = v;
        }
        if let Some(v) = get(vars, "CELLNET_FRAMES_AHEAD", |s| {
            from_str::<u64>(s).and_then(nonzero)
        })? {
            c.frames_ahead = v;
        }
        let l = c.liveness;
        if l.heartbeat >= l.suspect_after || l.suspect_after >= l.dead_after {
            return Err(ConfigError {
                var: "CELLNET_HEARTBEAT / _SUSPECT_AFTER / _DEAD_AFTER",
                value: format!(
                    "{:?} / {:?} / {:?}",
                    l.heartbeat, l.suspect_after, l.dead_after
                ),
                reason: "must grow: heartbeat < suspect after < dead after".into(),
            });
        }
        // A node-mate silent in the handshake is given up on like a
        // watched peer: after the dead-after time.
        c.discovery.give_up_after = l.dead_after;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::launch::tests::vars;

    #[test]
    fn variables_override_defaults() {
        let c = Config::from_vars(&vars(&[
            ("CELLNET_DISCOVERY_PORT", "5000"),
            ("CELLNET_COORDINATOR", "n001:6000"),
            ("CELLNET_WINDOW", "8"),
            ("CELLNET_WINDOW_BYTES", "64KiB"),
            ("CELLNET_SEND_DEADLINE", "1500ms"),
            ("CELLNET_IPC_DIR", "none"),
            ("CELLNET_PLACEMENT", "none"),
            ("CELLNET_MALLOC_TUNE", "0"),
        ]))
        .unwrap();
        assert!(!c.malloc_tune && Config::default().malloc_tune);
        assert_eq!(c.discovery_port, 5000);
        assert_eq!(c.coordinator.as_deref(), Some("n001:6000"));
        assert_eq!(c.reliable.window, 8);
        assert_eq!(c.window_bytes, 64 << 10);
        assert_eq!(c.reliable.deadline, Duration::from_millis(1500));
        assert_eq!(c.ipc_dir, None);
        assert_eq!(c.placement, PlacementPolicy::None);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("CELLNET_DISCOVERY_PORT", "70000"),
            ("CELLNET_COORDINATOR", "nohostport"),
            ("CELLNET_WINDOW", "0"),
            ("CELLNET_WINDOW", "16385"),
            ("CELLNET_WINDOW_BYTES", "0"),
            ("CELLNET_WINDOW_BYTES", "16 MB"),
            ("CELLNET_WINDOW_BYTES", "99999999999GiB"),
            ("CELLNET_JOIN_TIMEOUT", "soon"),
            ("CELLNET_BROADCAST", "1.2.3"),
            ("CELLNET_PLACEMENT", "sideways"),
            ("CELLNET_MALLOC_TUNE", "maybe"),
        ] {
            let err = Config::from_vars(&vars(&[(var, value)])).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(value), "{err}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512B"), Ok(512));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes(" 16MiB "), Ok(16 << 20));
        assert_eq!(parse_bytes("1 GiB"), Ok(1 << 30));
        assert!(parse_bytes("16MB").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("99999999999GiB").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("NaNs").is_err());
    }
}
