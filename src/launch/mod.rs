//! `launch`: who am I. Owns the identity of this instance in the job — rank,
//! size, node, local rank, number of nodes and the job key — taken from MPI
//! ([`mpi`]), the Slurm environment ([`slurm`]) or explicit `CELLNET_*`
//! variables ([`from_explicit`]).
//!
//! The parsers are pure functions over a map of variables; only [`detect`]
//! reads the real environment, and only [`mpi`] talks to MPI. This module does
//! not bind CPUs (that is `place`) and opens no sockets.
//!
//! Variables read by the explicit launcher (for tests and other launchers):
//!
//! | variable             | meaning                              | default            |
//! |----------------------|--------------------------------------|--------------------|
//! | `CELLNET_RANK`       | global rank, `< CELLNET_SIZE`        | required           |
//! | `CELLNET_SIZE`       | number of instances in the job       | required           |
//! | `CELLNET_NODE`       | this node's name                     | the hostname       |
//! | `CELLNET_NODE_INDEX` | index of this node, `< CELLNET_NODES`| 0                  |
//! | `CELLNET_LOCAL_RANK` | rank among the instances of the node | `CELLNET_RANK`     |
//! | `CELLNET_LOCAL_SIZE` | instances on this node               | `CELLNET_SIZE`     |
//! | `CELLNET_NODES`      | number of nodes                      | 1                  |
//! | `CELLNET_JOB_KEY`    | job key, decimal or `0x` hex u64     | see below          |
//! | `CELLNET_LAUNCH`     | launch mode for [`LaunchMode`]       | `auto` (read by callers) |
//!
//! `CELLNET_JOB_KEY` overrides the job key for every launcher. Without it,
//! Slurm jobs hash job and step id, MPI jobs use a random value chosen by
//! world rank 0, and explicit/single instances use the fixed
//! [`DEFAULT_JOB_KEY`]: two explicit jobs running side by side on one node
//! must set different `CELLNET_JOB_KEY`s.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::proto::JobKey;

pub mod mpi;
pub mod slurm;

pub use self::mpi::MpiSession;

/// Where a [`LaunchInfo`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LaunchSource {
    /// MPI world communicator (`mpirun`, or `srun --mpi=pmix`).
    Mpi,
    /// Slurm task variables (`srun` without MPI).
    Slurm,
    /// `CELLNET_*` variables.
    Explicit,
    /// Nothing found: a lone instance, rank 0 of 1.
    Single,
}

impl fmt::Display for LaunchSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LaunchSource::Mpi => "mpi",
            LaunchSource::Slurm => "slurm",
            LaunchSource::Explicit => "explicit",
            LaunchSource::Single => "single",
        })
    }
}

/// Identity of this instance in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchInfo {
    /// Global rank, `0..size`.
    pub rank: u32,
    /// Number of instances in the job.
    pub size: u32,
    /// Name of this node (Slurm node name, MPI processor name or hostname).
    pub node_name: String,
    /// Index of this node, `0..nodes`.
    pub node_index: u32,
    /// Rank among the instances on this node, `0..local_size`.
    pub local_rank: u32,
    /// Number of instances on this node.
    pub local_size: u32,
    /// Number of nodes in the job.
    pub nodes: u32,
    /// Separates jobs that share a node.
    pub job_key: JobKey,
    /// Which launcher this came from.
    pub source: LaunchSource,
    /// Hostnames of all nodes in `node_index` order when known (Slurm: the
    /// node list; MPI: the node leaders' processor names); empty otherwise.
    pub node_list: Vec<String>,
}

impl fmt::Display for LaunchInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {}/{} node {} ({}/{}) local {}/{} job_key {:#018x} source {}",
            self.rank,
            self.size,
            self.node_name,
            self.node_index,
            self.nodes,
            self.local_rank,
            self.local_size,
            self.job_key.0,
            self.source
        )
    }
}

/// Which launcher [`detect`] should believe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LaunchMode {
    /// MPI if an MPI launcher's variables are present, else Slurm if
    /// `SLURM_PROCID` is set, else explicit if `CELLNET_RANK` is set, else
    /// single.
    #[default]
    Auto,
    /// Initialize MPI and take the identity from `MPI_COMM_WORLD`.
    Mpi,
    /// Take the identity from `SLURM_*` variables (`srun`).
    Slurm,
    /// Take the identity from `CELLNET_RANK`, `CELLNET_SIZE`, … (any launcher).
    Explicit,
    /// A job of one instance: rank 0 of 1, on one node.
    Single,
}

impl FromStr for LaunchMode {
    type Err = LaunchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(LaunchMode::Auto),
            "mpi" => Ok(LaunchMode::Mpi),
            "slurm" => Ok(LaunchMode::Slurm),
            "explicit" => Ok(LaunchMode::Explicit),
            "single" => Ok(LaunchMode::Single),
            _ => Err(LaunchError::UnknownMode(s.to_string())),
        }
    }
}

impl fmt::Display for LaunchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LaunchMode::Auto => "auto",
            LaunchMode::Mpi => "mpi",
            LaunchMode::Slurm => "slurm",
            LaunchMode::Explicit => "explicit",
            LaunchMode::Single => "single",
        })
    }
}

/// Something in the launch environment that cellnet cannot use.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A variable the chosen launcher needs is not set.
    #[error("{var} is not set (needed by {context})")]
    Missing {
        /// The variable.
        var: &'static str,
        /// Who needs it (the launch mode or setting).
        context: &'static str,
    },
    /// A variable that must hold a non-negative integer does not.
    #[error("{var}={value} is not a number")]
    NotANumber {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// A count that must be at least one is zero.
    #[error("{var}={value} must be at least 1")]
    Zero {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// An index is out of range of the count it indexes.
    #[error("{var}={value} is not below {limit_var}={limit}")]
    NotBelow {
        /// The index variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// The count it must stay below.
        limit_var: &'static str,
        /// That count's value (with context where it is derived).
        limit: String,
    },
    /// A count larger than the count that contains it.
    #[error("{var}={value} is larger than {limit_var}={limit}")]
    TooLarge {
        /// The count variable.
        var: &'static str,
        /// Its value.
        value: u32,
        /// The count that contains it.
        limit_var: &'static str,
        /// That count's value.
        limit: u32,
    },
    /// A Slurm host list that does not parse.
    #[error("{var}={value} is not a valid Slurm node list: {reason}")]
    BadNodeList {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What does not parse.
        reason: String,
    },
    /// A Slurm tasks-per-node list that does not parse.
    #[error("{var}={value} is not a valid Slurm tasks-per-node list such as 4(x16),2: {reason}")]
    BadTasksPerNode {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What does not parse.
        reason: String,
    },
    /// Two variables disagree about how many nodes or tasks there are.
    #[error("{var}={value} gives {found} {what} but {expected_var}={expected}")]
    CountMismatch {
        /// The variable holding the list.
        var: &'static str,
        /// Its value.
        value: String,
        /// How many entries the list gives.
        found: usize,
        /// What is counted: `nodes` or `tasks`.
        what: &'static str,
        /// The variable holding the expected count.
        expected_var: &'static str,
        /// The expected count.
        expected: u32,
    },
    /// `CELLNET_JOB_KEY` is neither decimal nor `0x` hex.
    #[error("CELLNET_JOB_KEY={0} is not a job key (a decimal or 0x-hex 64-bit number)")]
    BadJobKey(String),
    /// A launch mode string that is not one of the known modes.
    #[error("launch mode {0:?} is unknown: use auto, mpi, slurm, explicit or single")]
    UnknownMode(String),
    /// MPI was already initialized by someone else in this process.
    #[error(
        "MPI is already initialized in this process; cellnet must initialize it (call detect once)"
    )]
    MpiAlreadyInitialized,
    /// An MPI world larger than `u32` ranks or with inconsistent answers.
    #[error("MPI returned an unusable value: {0}")]
    MpiValue(String),
}

/// Variables whose presence means an MPI launcher started us. `srun
/// --mpi=pmix` sets `PMIX_RANK` as well as `SLURM_PROCID`: MPI wins then,
/// which is right because MPI knows the node-local groups.
pub const MPI_MARKERS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"];

/// Job key of explicit and single instances without `CELLNET_JOB_KEY`.
pub const DEFAULT_JOB_KEY: JobKey = JobKey(fnv1a64(b"cellnet"));

/// The process environment as a map (values that are not UTF-8 are
/// converted lossily, so they fail to parse instead of vanishing).
pub fn env_vars() -> HashMap<String, String> {
    std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// Turns [`LaunchMode::Auto`] into the concrete mode the variables call for;
/// other modes are returned unchanged.
pub fn resolve_mode(mode: LaunchMode, vars: &HashMap<String, String>) -> LaunchMode {
    if mode != LaunchMode::Auto {
        return mode;
    }
    if MPI_MARKERS.iter().any(|m| vars.contains_key(*m)) {
        LaunchMode::Mpi
    } else if vars.contains_key("SLURM_PROCID") {
        LaunchMode::Slurm
    } else if vars.contains_key("CELLNET_RANK") {
        LaunchMode::Explicit
    } else {
        LaunchMode::Single
    }
}

/// Finds out who this instance is, reading the real environment (and
/// initializing MPI in MPI mode). Under MPI the returned [`MpiSession`] must
/// be kept alive until the process is done with MPI: dropping it finalizes.
pub fn detect(mode: LaunchMode) -> Result<(LaunchInfo, Option<MpiSession>), LaunchError> {
    let vars = env_vars();
    match resolve_mode(mode, &vars) {
        LaunchMode::Mpi => {
            let (info, session) = mpi::from_mpi(&vars)?;
            Ok((info, Some(session)))
        }
        LaunchMode::Slurm => Ok((slurm::from_slurm(&vars)?, None)),
        LaunchMode::Explicit => Ok((from_explicit(&vars)?, None)),
        LaunchMode::Single | LaunchMode::Auto => Ok((single(&vars)?, None)),
    }
}

/// Builds a [`LaunchInfo`] from `CELLNET_*` variables (table in the module
/// documentation).
pub fn from_explicit(vars: &HashMap<String, String>) -> Result<LaunchInfo, LaunchError> {
    const CONTEXT: &str = "the explicit launcher (CELLNET_*)";
    let rank = required_number(vars, "CELLNET_RANK", CONTEXT)?;
    let size = match vars.get("CELLNET_SIZE") {
        Some(v) => positive("CELLNET_SIZE", v)?,
        None => {
            return Err(LaunchError::Missing {
                var: "CELLNET_SIZE",
                context: CONTEXT,
            })
        }
    };
    let nodes = match vars.get("CELLNET_NODES") {
        Some(v) => positive("CELLNET_NODES", v)?,
        None => 1,
    };
    let node_index = optional_number(vars, "CELLNET_NODE_INDEX")?.unwrap_or(0);
    let local_rank = optional_number(vars, "CELLNET_LOCAL_RANK")?.unwrap_or(rank);
    let local_size = match vars.get("CELLNET_LOCAL_SIZE") {
        Some(v) => positive("CELLNET_LOCAL_SIZE", v)?,
        None => size,
    };
    below("CELLNET_RANK", rank, "CELLNET_SIZE", size)?;
    below("CELLNET_NODE_INDEX", node_index, "CELLNET_NODES", nodes)?;
    below(
        "CELLNET_LOCAL_RANK",
        local_rank,
        "CELLNET_LOCAL_SIZE",
        local_size,
    )?;
    for (var, value) in [("CELLNET_LOCAL_SIZE", local_size), ("CELLNET_NODES", nodes)] {
        if value > size {
            return Err(LaunchError::TooLarge {
                var,
                value,
                limit_var: "CELLNET_SIZE",
                limit: size,
            });
        }
    }
    let node_name = match vars.get("CELLNET_NODE").filter(|n| !n.is_empty()) {
        Some(n) => n.clone(),
        None => hostname(),
    };
    Ok(LaunchInfo {
        rank,
        size,
        node_name,
        node_index,
        local_rank,
        local_size,
        nodes,
        job_key: job_key_override(vars)?.unwrap_or(DEFAULT_JOB_KEY),
        source: LaunchSource::Explicit,
        node_list: Vec::new(),
    })
}

/// A lone instance: rank 0 of 1 on one node (job key from `CELLNET_JOB_KEY`
/// or [`DEFAULT_JOB_KEY`]).
pub fn single(vars: &HashMap<String, String>) -> Result<LaunchInfo, LaunchError> {
    Ok(LaunchInfo {
        rank: 0,
        size: 1,
        node_name: hostname(),
        node_index: 0,
        local_rank: 0,
        local_size: 1,
        nodes: 1,
        job_key: job_key_override(vars)?.unwrap_or(DEFAULT_JOB_KEY),
        source: LaunchSource::Single,
        node_list: Vec::new(),
    })
}

/// Parses a job key: decimal, or hexadecimal with a `0x` prefix.
pub fn parse_job_key(value: &str) -> Result<JobKey, LaunchError> {
    let v = value.trim();
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed
        .map(JobKey)
        .map_err(|_| LaunchError::BadJobKey(value.to_string()))
}

/// `CELLNET_JOB_KEY` if set.
pub(crate) fn job_key_override(
    vars: &HashMap<String, String>,
) -> Result<Option<JobKey>, LaunchError> {
    vars.get("CELLNET_JOB_KEY")
        .map(|v| parse_job_key(v))
        .transpose()
}

fn parse_u32(var: &'static str, value: &str) -> Result<u32, LaunchError> {
    let v = value.trim();
    // `u32::from_str` accepts a leading '+'; a launcher never writes one.
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LaunchError::NotANumber {
            var,
            value: value.to_string(),
        });
    }
    v.parse().map_err(|_| LaunchError::NotANumber {
        var,
        value: value.to_string(),
    })
}

pub(crate) fn optional_number(
    vars: &HashMap<String, String>,
    var: &'static str,
) -> Result<Option<u32>, LaunchError> {
    vars.get(var).map(|v| parse_u32(var, v)).transpose()
}

pub(crate) fn required_number(
    vars: &HashMap<String, String>,
    var: &'static str,
    context: &'static str,
) -> Result<u32, LaunchError> {
    optional_number(vars, var)?.ok_or(LaunchError::Missing { var, context })
}

/// A count that must be at least one.
pub(crate) fn positive(var: &'static str, value: &str) -> Result<u32, LaunchError> {
    match parse_u32(var, value)? {
        0 => Err(LaunchError::Zero {
            var,
            value: value.to_string(),
        }),
        n => Ok(n),
    }
}

fn below(
    var: &'static str,
    value: u32,
    limit_var: &'static str,
    limit: u32,
) -> Result<(), LaunchError> {
    if value < limit {
        Ok(())
    } else {
        Err(LaunchError::NotBelow {
            var,
            value: value.to_string(),
            limit_var,
            limit: limit.to_string(),
        })
    }
}

/// 64-bit FNV-1a: a hash that is the same in every process and every Rust
/// version (unlike `DefaultHasher`), so all instances derive the same key.
pub(crate) const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// This machine's hostname, or `"localhost"` if it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A variable map from literal pairs (shared by the launch, Slurm and
    /// config tests).
    pub(crate) fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn explicit_defaults_to_one_node() {
        let info = from_explicit(&vars(&[
            ("CELLNET_RANK", "1"),
            ("CELLNET_SIZE", "2"),
            ("CELLNET_NODE", "box"),
        ]))
        .unwrap();
        assert_eq!((info.rank, info.size), (1, 2));
        assert_eq!((info.local_rank, info.local_size), (1, 2));
        assert_eq!((info.node_index, info.nodes), (0, 1));
        assert_eq!(info.node_name, "box");
        assert_eq!(info.job_key, DEFAULT_JOB_KEY);
        assert_eq!(info.source, LaunchSource::Explicit);
    }

    #[test]
    fn explicit_full_set() {
        let info = from_explicit(&vars(&[
            ("CELLNET_RANK", "5"),
            ("CELLNET_SIZE", "8"),
            ("CELLNET_NODE", "n2"),
            ("CELLNET_NODE_INDEX", "1"),
            ("CELLNET_LOCAL_RANK", "1"),
            ("CELLNET_LOCAL_SIZE", "4"),
            ("CELLNET_NODES", "2"),
            ("CELLNET_JOB_KEY", "0xdeadBEEF"),
        ]))
        .unwrap();
        assert_eq!((info.node_index, info.nodes), (1, 2));
        assert_eq!((info.local_rank, info.local_size), (1, 4));
        assert_eq!(info.job_key, JobKey(0xdead_beef));
    }

    #[test]
    fn explicit_errors_name_variable_and_value() {
        let err =
            from_explicit(&vars(&[("CELLNET_RANK", "abc"), ("CELLNET_SIZE", "4")])).unwrap_err();
        assert!(matches!(
            err,
            LaunchError::NotANumber {
                var: "CELLNET_RANK",
                ..
            }
        ));
        assert_eq!(err.to_string(), "CELLNET_RANK=abc is not a number");

        let err =
            from_explicit(&vars(&[("CELLNET_RANK", "4"), ("CELLNET_SIZE", "4")])).unwrap_err();
        assert!(matches!(
            err,
            LaunchError::NotBelow {
                var: "CELLNET_RANK",
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "CELLNET_RANK=4 is not below CELLNET_SIZE=4"
        );

        let err =
            from_explicit(&vars(&[("CELLNET_RANK", "0"), ("CELLNET_SIZE", "0")])).unwrap_err();
        assert!(matches!(
            err,
            LaunchError::Zero {
                var: "CELLNET_SIZE",
                ..
            }
        ));

        let err = from_explicit(&vars(&[("CELLNET_RANK", "0")])).unwrap_err();
        assert!(matches!(
            err,
            LaunchError::Missing {
                var: "CELLNET_SIZE",
                ..
            }
        ));

        for bad in ["-1", "+1", "", "1.0", "99999999999"] {
            let err =
                from_explicit(&vars(&[("CELLNET_RANK", bad), ("CELLNET_SIZE", "4")])).unwrap_err();
            assert!(
                matches!(err, LaunchError::NotANumber { .. }),
                "{bad:?}: {err}"
            );
        }

        let err = from_explicit(&vars(&[
            ("CELLNET_RANK", "3"),
            ("CELLNET_SIZE", "4"),
            ("CELLNET_LOCAL_SIZE", "2"),
        ]))
        .unwrap_err();
        // CELLNET_LOCAL_RANK defaults to CELLNET_RANK.
        assert_eq!(
            err.to_string(),
            "CELLNET_LOCAL_RANK=3 is not below CELLNET_LOCAL_SIZE=2"
        );

        let err = from_explicit(&vars(&[
            ("CELLNET_RANK", "0"),
            ("CELLNET_SIZE", "4"),
            ("CELLNET_JOB_KEY", "0xzz"),
        ]))
        .unwrap_err();
        assert!(matches!(err, LaunchError::BadJobKey(_)));

        let err = from_explicit(&vars(&[
            ("CELLNET_RANK", "0"),
            ("CELLNET_SIZE", "2"),
            ("CELLNET_NODES", "3"),
            ("CELLNET_LOCAL_SIZE", "1"),
        ]))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "CELLNET_NODES=3 is larger than CELLNET_SIZE=2"
        );
    }

    #[test]
    fn auto_prefers_mpi_then_slurm_then_explicit() {
        let auto = |pairs: &[(&str, &str)]| resolve_mode(LaunchMode::Auto, &vars(pairs));
        assert_eq!(auto(&[]), LaunchMode::Single);
        assert_eq!(auto(&[("CELLNET_RANK", "0")]), LaunchMode::Explicit);
        assert_eq!(
            auto(&[("CELLNET_RANK", "0"), ("SLURM_PROCID", "0")]),
            LaunchMode::Slurm
        );
        // srun --mpi=pmix sets both.
        assert_eq!(
            auto(&[("SLURM_PROCID", "0"), ("PMIX_RANK", "0")]),
            LaunchMode::Mpi
        );
        assert_eq!(auto(&[("OMPI_COMM_WORLD_SIZE", "4")]), LaunchMode::Mpi);
        assert_eq!(
            resolve_mode(LaunchMode::Explicit, &vars(&[("PMI_RANK", "0")])),
            LaunchMode::Explicit
        );
    }

    #[test]
    fn launch_mode_round_trips() {
        for mode in [
            LaunchMode::Auto,
            LaunchMode::Mpi,
            LaunchMode::Slurm,
            LaunchMode::Explicit,
            LaunchMode::Single,
        ] {
            assert_eq!(mode.to_string().parse::<LaunchMode>().unwrap(), mode);
        }
        assert_eq!("MPI".parse::<LaunchMode>().unwrap(), LaunchMode::Mpi);
        assert!(matches!(
            "pbs".parse::<LaunchMode>(),
            Err(LaunchError::UnknownMode(_))
        ));
    }

    #[test]
    fn job_key_parses_decimal_and_hex() {
        assert_eq!(parse_job_key("42").unwrap(), JobKey(42));
        assert_eq!(parse_job_key("0x2A").unwrap(), JobKey(42));
        assert!(parse_job_key("0x").is_err());
        assert!(parse_job_key("18446744073709551616").is_err());
        assert_ne!(DEFAULT_JOB_KEY, JobKey(0));
    }

    mod never_panic {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn explicit_on_arbitrary_values(
                rank in ".{0,6}", size in "[0-9]{0,3}", lrank in "[0-9a]{0,2}",
                lsize in "[0-9]{0,2}", nodes in "[0-9]{0,2}", idx in "[0-9]{0,2}", key in ".{0,8}",
            ) {
                let env = vars(&[
                    ("CELLNET_RANK", &rank), ("CELLNET_SIZE", &size),
                    ("CELLNET_LOCAL_RANK", &lrank), ("CELLNET_LOCAL_SIZE", &lsize),
                    ("CELLNET_NODES", &nodes), ("CELLNET_NODE_INDEX", &idx),
                    ("CELLNET_JOB_KEY", &key), ("CELLNET_NODE", "n"),
                ]);
                if let Ok(info) = from_explicit(&env) {
                    prop_assert!(info.rank < info.size);
                    prop_assert!(info.local_rank < info.local_size);
                    prop_assert!(info.node_index < info.nodes);
                }
            }
        }
    }
}
