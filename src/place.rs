//! `place`: CPU placement with hwloc. Owns binding this instance (the whole
//! process) to its cores, binding its rayon workers inside that set, and
//! reporting the binding actually obtained.
//!
//! Three steps: read the topology into a [`CpuTopology`] (cores and their
//! PUs), [`plan`] the PUs of one instance (pure), [`apply`] the plan and read
//! it back. It does not decide ranks (that is `launch`) and starts no threads
//! except the workers of the pools it builds.
//!
//! Run programs that bind with hwloc under `mpirun --bind-to none` (or
//! `srun --cpu-bind=none`), or use [`PlacementPolicy::None`] to keep the
//! launcher's binding.

use std::fmt;
use std::str::FromStr;

use hwloc2::{CpuBindFlags, CpuSet, ObjectType, Topology};

/// How the instances of one node share its cores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PlacementPolicy {
    /// Each local rank gets a block of neighbouring cores.
    #[default]
    Compact,
    /// Local ranks take cores round-robin (rank r: cores r, r+n, r+2n, …).
    Scatter,
    /// No binding: keep whatever the launcher set (`srun --cpu-bind`, …).
    None,
}

impl FromStr for PlacementPolicy {
    type Err = PlaceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "compact" => Ok(PlacementPolicy::Compact),
            "scatter" => Ok(PlacementPolicy::Scatter),
            "none" => Ok(PlacementPolicy::None),
            _ => Err(PlaceError::UnknownPolicy(s.to_string())),
        }
    }
}

impl fmt::Display for PlacementPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlacementPolicy::Compact => "compact",
            PlacementPolicy::Scatter => "scatter",
            PlacementPolicy::None => "none",
        })
    }
}

/// What went wrong while placing this instance.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// A policy string that is not one of the known policies.
    #[error("placement policy {0:?} is unknown: use compact, scatter or none")]
    UnknownPolicy(String),
    /// hwloc could not load the topology of this machine.
    #[error("hwloc could not read the CPU topology of this machine")]
    Topology,
    /// The topology has no processing units we are allowed to use.
    #[error("hwloc found no usable processing units (PUs) on this machine")]
    NoPus,
    /// A local rank outside `0..local_size`.
    #[error("local rank {local_rank} is not below local size {local_size}")]
    BadLocalRank {
        /// The local rank given.
        local_rank: u32,
        /// Instances on the node.
        local_size: u32,
    },
    /// The OS refused to bind the process (a container or cgroup may forbid it).
    #[error("binding the process to PUs {cpuset} failed: {reason}")]
    BindProcess {
        /// The PUs asked for as a CPU list (OS indices, `0-2,5`).
        cpuset: String,
        /// hwloc's error.
        reason: String,
    },
    /// The binding could not be read back.
    #[error("reading the CPU binding of the {what} failed: {reason}")]
    ReadBinding {
        /// Whose binding: `process` or `calling thread`.
        what: &'static str,
        /// hwloc's error.
        reason: String,
    },
    /// A thread could not be bound.
    #[error("binding a thread to PUs {cpuset} failed: {reason}")]
    BindThread {
        /// The PUs asked for as a CPU list (OS indices, `0-2,5`).
        cpuset: String,
        /// The OS error.
        reason: String,
    },
    /// A PU index beyond what `sched_setaffinity`'s fixed-size set can hold.
    #[error("PU {0} is beyond the {max} CPUs a thread binding can name", max = libc::CPU_SETSIZE)]
    PuOutOfRange(u32),
    /// Rayon could not start the pool.
    #[error("starting the rayon pool failed: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
}

/// The usable PUs of a node grouped per core, both in topology order.
/// PUs are OS indices (what `taskset` and `/proc/cpuinfo` call CPUs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuTopology {
    /// One entry per core: its PUs (OS indices).
    pub cores: Vec<Vec<u32>>,
}

impl CpuTopology {
    /// Reads the cores of this machine (restricted to the PUs the process is
    /// allowed to use, e.g. by a Slurm cgroup).
    pub fn detect() -> Result<Self, PlaceError> {
        let topology = Topology::new().ok_or(PlaceError::Topology)?;
        Self::from_hwloc(&topology)
    }

    fn from_hwloc(topology: &Topology) -> Result<Self, PlaceError> {
        let mut cores: Vec<Vec<u32>> = topology
            .objects_with_type(&ObjectType::Core)
            .unwrap_or_default()
            .iter()
            .filter_map(|core| core.cpuset())
            .map(|set| set.into_iter().collect::<Vec<u32>>())
            .filter(|pus| !pus.is_empty())
            .collect();
        if cores.is_empty() {
            // Some virtual machines report PUs without cores: one core per PU.
            cores = topology
                .objects_with_type(&ObjectType::PU)
                .unwrap_or_default()
                .iter()
                .map(|pu| vec![pu.os_index()])
                .collect();
        }
        if cores.is_empty() {
            return Err(PlaceError::NoPus);
        }
        Ok(CpuTopology { cores })
    }

    /// Number of PUs.
    pub fn pu_count(&self) -> usize {
        self.cores.iter().map(Vec::len).sum()
    }
}

/// The PUs instance `local_rank` of `local_size` on this node gets under
/// `policy`, in topology order; `None` for [`PlacementPolicy::None`] (do not
/// bind) and for inputs that admit no plan (no PUs, rank out of range).
///
/// The unit handed out is a core while there are at least as many cores as
/// local ranks. With more ranks than cores the unit becomes a PU (so two
/// ranks on a hyperthreaded core get one hardware thread each), handed out
/// round-robin, wrapping when there are more ranks than PUs: ranks then
/// share PUs, which is the best an oversubscribed node can do.
pub fn plan(
    topo: &CpuTopology,
    local_rank: u32,
    local_size: u32,
    policy: PlacementPolicy,
) -> Option<Vec<u32>> {
    if policy == PlacementPolicy::None || local_rank >= local_size || topo.pu_count() == 0 {
        return None;
    }
    let (r, k) = (local_rank as usize, local_size as usize);
    let cores: Vec<&Vec<u32>> = topo.cores.iter().filter(|c| !c.is_empty()).collect();
    if k > cores.len() {
        let pus: Vec<u32> = match policy {
            // Fill a core's hardware threads before moving on.
            PlacementPolicy::Compact => cores.iter().flat_map(|c| c.iter().copied()).collect(),
            // First PU of every core, then the second of every core, …
            _ => {
                let depth = cores.iter().map(|c| c.len()).max().unwrap_or(0);
                (0..depth)
                    .flat_map(|i| cores.iter().filter_map(move |c| c.get(i).copied()))
                    .collect()
            }
        };
        return Some(vec![pus[r % pus.len()]]);
    }
    let n = cores.len();
    let chosen: Vec<usize> = match policy {
        PlacementPolicy::Compact => {
            let (q, rem) = (n / k, n % k);
            let start = r * q + r.min(rem);
            let len = q + usize::from(r < rem);
            (start..start + len).collect()
        }
        _ => (r..n).step_by(k).collect(),
    };
    Some(
        chosen
            .into_iter()
            .flat_map(|i| cores[i].iter().copied())
            .collect(),
    )
}

/// The binding this instance ended up with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The policy that was applied.
    pub policy: PlacementPolicy,
    /// PUs (OS indices) the process may run on, as read back from the OS.
    pub cpuset: Vec<u32>,
    /// The same as a CPU list, e.g. `0-1` or `0,2`.
    pub cpuset_string: String,
}

impl Binding {
    fn from_pus(policy: PlacementPolicy, cpuset: Vec<u32>) -> Self {
        let cpuset_string = format_cpu_list(&cpuset);
        Binding {
            policy,
            cpuset,
            cpuset_string,
        }
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} PUs {}", self.policy, self.cpuset_string)
    }
}

/// Binds this process as `policy` says for instance `local_rank` of
/// `local_size` on the node, then reads the binding back. With
/// [`PlacementPolicy::None`] nothing is changed and the existing binding is
/// reported. Call it before starting threads that should inherit it.
pub fn apply(
    policy: PlacementPolicy,
    local_rank: u32,
    local_size: u32,
) -> Result<Binding, PlaceError> {
    if local_rank >= local_size {
        return Err(PlaceError::BadLocalRank {
            local_rank,
            local_size,
        });
    }
    let mut topology = Topology::new().ok_or(PlaceError::Topology)?;
    let topo = CpuTopology::from_hwloc(&topology)?;
    if let Some(pus) = plan(&topo, local_rank, local_size, policy) {
        let set: CpuSet = pus.iter().copied().collect();
        topology
            .set_cpubind(set, CpuBindFlags::CPUBIND_PROCESS)
            .map_err(|e| PlaceError::BindProcess {
                cpuset: format_cpu_list(&pus),
                reason: format!("{e:?}"),
            })?;
    }
    read_binding(&topology, policy)
}

/// Reports the current binding of this process without changing it.
///
/// Read from the OS (the union of every thread's affinity, as hwloc's
/// process binding reads it on Linux), not through an hwloc topology:
/// loading one costs milliseconds of CPU (hwloc opens its GPU and X11
/// plugins), which an instance starting among many on a few cores pays
/// before it can bind its sockets.
pub fn current_binding(policy: PlacementPolicy) -> Result<Binding, PlaceError> {
    Ok(Binding::from_pus(policy, process_pus()?))
}

/// The PUs any thread of this process may run on (the union over its
/// threads; just the calling thread's if `/proc/self/task` is unreadable).
pub fn process_pus() -> Result<Vec<u32>, PlaceError> {
    let mut pus = current_thread_pus()?;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for tid in tasks
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        {
            // A thread that ended meanwhile has no affinity to add.
            if let Ok(more) = thread_pus(tid) {
                pus.extend(more);
            }
        }
    }
    pus.sort_unstable();
    pus.dedup();
    Ok(pus)
}

fn read_binding(topology: &Topology, policy: PlacementPolicy) -> Result<Binding, PlaceError> {
    let set = topology
        .get_cpubind(CpuBindFlags::CPUBIND_PROCESS)
        .ok_or_else(|| PlaceError::ReadBinding {
            what: "process",
            reason: std::io::Error::last_os_error().to_string(),
        })?;
    Ok(Binding::from_pus(policy, set.into_iter().collect()))
}

/// Builds a rayon pool of `threads` workers (0: one per PU of `binding`, at
/// least 1), worker `i` bound to PU `binding.cpuset[i % n]` if `pin` (else
/// the workers keep the process's affinity).
///
/// The thread count is always explicit: a pool built from a thread bound to
/// one PU would otherwise size itself to one worker. Each worker is bound
/// by the building thread right after it is spawned (not by the worker
/// itself), so this returns without waiting for the workers to be
/// scheduled: on a busy node that wait can take many milliseconds. A
/// worker that fails to bind makes this return [`PlaceError::BindThread`].
pub fn build_pool(
    threads: usize,
    binding: &Binding,
    pin: bool,
) -> Result<rayon::ThreadPool, PlaceError> {
    use std::os::unix::thread::JoinHandleExt;
    let pus = binding.cpuset.clone();
    let threads = if threads == 0 {
        pus.len().max(1)
    } else {
        threads
    };
    if let Some(&pu) = pus
        .iter()
        .find(|&&pu| pu as usize >= libc::CPU_SETSIZE as usize)
    {
        return Err(PlaceError::PuOutOfRange(pu));
    }
    let mut failure = None;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .spawn_handler(|worker| {
            let i = worker.index();
            let mut builder = std::thread::Builder::new().name(format!("cellnet-worker-{i}"));
            if let Some(size) = worker.stack_size() {
                builder = builder.stack_size(size);
            }
            // Detached, as rayon's own spawn does: the pool ends its workers.
            let handle = builder.spawn(move || worker.run())?;
            if pin && !pus.is_empty() && failure.is_none() {
                if let Err(e) = bind_thread(handle.as_pthread_t(), &[pus[i % pus.len()]]) {
                    failure = Some(e);
                }
            }
            Ok(())
        })
        .build()?;
    match failure {
        Some(e) => Err(e),
        None => Ok(pool),
    }
}

/// Binds thread `thread` of this process (only) to `pus`.
fn bind_thread(thread: libc::pthread_t, pus: &[u32]) -> Result<(), PlaceError> {
    let set = cpu_set(pus)?;
    // SAFETY: `thread` is a live thread of this process (the caller, or
    // one just spawned: a rayon worker only ends when its pool is
    // dropped); the set is initialized and sized.
    let rc = unsafe {
        libc::pthread_setaffinity_np(thread, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(PlaceError::BindThread {
            cpuset: format_cpu_list(pus),
            reason: std::io::Error::from_raw_os_error(rc).to_string(),
        });
    }
    Ok(())
}

fn cpu_set(pus: &[u32]) -> Result<libc::cpu_set_t, PlaceError> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &pu in pus {
        if pu as usize >= libc::CPU_SETSIZE as usize {
            return Err(PlaceError::PuOutOfRange(pu));
        }
        // SAFETY: `pu` was checked to be below CPU_SETSIZE.
        unsafe { libc::CPU_SET(pu as usize, &mut set) };
    }
    Ok(set)
}

/// Binds the calling thread (only) to `pus`.
pub fn bind_current_thread(pus: &[u32]) -> Result<(), PlaceError> {
    // SAFETY: pthread_self has no preconditions.
    bind_thread(unsafe { libc::pthread_self() }, pus)
}

/// The PUs the calling thread may run on.
pub fn current_thread_pus() -> Result<Vec<u32>, PlaceError> {
    thread_pus(0)
}

/// The PUs thread `tid` of this process may run on (0: the calling thread).
fn thread_pus(tid: i32) -> Result<Vec<u32>, PlaceError> {
    // SAFETY: as in `bind_current_thread`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set is initialized and sized; an unknown tid is an error.
    let rc =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(PlaceError::ReadBinding {
            what: "calling thread",
            reason: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok((0..libc::CPU_SETSIZE as u32)
        // SAFETY: every index is below CPU_SETSIZE.
        .filter(|&pu| unsafe { libc::CPU_ISSET(pu as usize, &set) })
        .collect())
}

/// Formats PUs as a Linux CPU list: `[0, 1, 2, 5]` becomes `0-2,5`.
pub fn format_cpu_list(pus: &[u32]) -> String {
    let mut sorted = pus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cores` cores with `threads` PUs each, numbered like Linux does on
    /// Intel: PU `c` and PU `c + cores` are the two threads of core `c`.
    fn topo(cores: u32, threads: u32) -> CpuTopology {
        CpuTopology {
            cores: (0..cores)
                .map(|c| (0..threads).map(|t| c + t * cores).collect())
                .collect(),
        }
    }

    fn plans(t: &CpuTopology, size: u32, policy: PlacementPolicy) -> Vec<Vec<u32>> {
        (0..size)
            .map(|r| plan(t, r, size, policy).unwrap())
            .collect()
    }

    #[test]
    fn compact_two_ranks_on_eight_cores_get_halves() {
        assert_eq!(
            plans(&topo(8, 1), 2, PlacementPolicy::Compact),
            [vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
        );
    }

    #[test]
    fn compact_uneven_split_gives_extra_cores_to_low_ranks() {
        assert_eq!(
            plans(&topo(8, 1), 3, PlacementPolicy::Compact),
            [vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]]
        );
    }

    #[test]
    fn scatter_deals_cores_round_robin() {
        assert_eq!(
            plans(&topo(8, 1), 3, PlacementPolicy::Scatter),
            [vec![0, 3, 6], vec![1, 4, 7], vec![2, 5]]
        );
    }

    #[test]
    fn oversubscribed_ranks_share_cores_round_robin() {
        for policy in [PlacementPolicy::Compact, PlacementPolicy::Scatter] {
            assert_eq!(
                plans(&topo(2, 1), 4, policy),
                [vec![0], vec![1], vec![0], vec![1]]
            );
        }
    }

    #[test]
    fn hyperthreads_stay_with_their_core() {
        let t = topo(4, 2);
        assert_eq!(
            plans(&t, 2, PlacementPolicy::Compact),
            [vec![0, 4, 1, 5], vec![2, 6, 3, 7]]
        );
        assert_eq!(
            plans(&t, 2, PlacementPolicy::Scatter),
            [vec![0, 4, 2, 6], vec![1, 5, 3, 7]]
        );
    }

    #[test]
    fn more_ranks_than_cores_get_one_hyperthread_each() {
        let t = topo(2, 2);
        // Compact fills core 0's threads first; scatter spreads over cores.
        assert_eq!(
            plans(&t, 4, PlacementPolicy::Compact),
            [vec![0], vec![2], vec![1], vec![3]]
        );
        assert_eq!(
            plans(&t, 4, PlacementPolicy::Scatter),
            [vec![0], vec![1], vec![2], vec![3]]
        );
    }

    #[test]
    fn none_and_impossible_inputs_do_not_bind() {
        let t = topo(2, 1);
        assert_eq!(plan(&t, 0, 1, PlacementPolicy::None), None);
        assert_eq!(plan(&t, 2, 2, PlacementPolicy::Compact), None);
        assert_eq!(plan(&t, 0, 0, PlacementPolicy::Compact), None);
        assert_eq!(
            plan(
                &CpuTopology { cores: vec![] },
                0,
                1,
                PlacementPolicy::Compact
            ),
            None
        );
    }

    #[test]
    fn policy_round_trips() {
        for p in [
            PlacementPolicy::Compact,
            PlacementPolicy::Scatter,
            PlacementPolicy::None,
        ] {
            assert_eq!(p.to_string().parse::<PlacementPolicy>().unwrap(), p);
        }
        assert!(matches!(
            "spread".parse::<PlacementPolicy>(),
            Err(PlaceError::UnknownPolicy(_))
        ));
    }

    #[test]
    fn cpu_list_compresses_runs() {
        assert_eq!(format_cpu_list(&[0, 1]), "0-1");
        assert_eq!(format_cpu_list(&[0, 2]), "0,2");
        assert_eq!(format_cpu_list(&[5, 0, 1, 2, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn this_machine_has_a_topology() {
        let t = CpuTopology::detect().unwrap();
        assert!(t.pu_count() >= 1);
        let binding = current_binding(PlacementPolicy::None).unwrap();
        assert!(!binding.cpuset.is_empty());
    }

    #[test]
    fn the_binding_read_from_the_os_is_what_hwloc_reads() {
        let topology = Topology::new().unwrap();
        let hwloc = read_binding(&topology, PlacementPolicy::None).unwrap();
        assert_eq!(current_binding(PlacementPolicy::None).unwrap(), hwloc);
    }

    #[test]
    fn spawned_thread_binds_to_one_pu_and_hwloc_reads_it_back() {
        let allowed = current_binding(PlacementPolicy::None).unwrap().cpuset;
        let target = *allowed.last().unwrap();
        let seen = std::thread::spawn(move || {
            bind_current_thread(&[target]).unwrap();
            let topology = Topology::new().unwrap();
            let set = topology.get_cpubind(CpuBindFlags::CPUBIND_THREAD).unwrap();
            (
                set.into_iter().collect::<Vec<u32>>(),
                current_thread_pus().unwrap(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(seen, (vec![target], vec![target]));
        // The test thread itself is untouched.
        assert_eq!(current_thread_pus().unwrap(), allowed);
    }

    #[test]
    fn pool_workers_are_pinned_inside_the_binding() {
        let binding = current_binding(PlacementPolicy::None).unwrap();
        let threads = binding.cpuset.len() + 1; // one more than PUs: wraps
        let pool = build_pool(threads, &binding, true).unwrap();
        assert_eq!(pool.current_num_threads(), threads);
        let seen = pool.broadcast(|ctx| (ctx.index(), current_thread_pus().unwrap()));
        for (i, pus) in seen {
            assert_eq!(
                pus,
                [binding.cpuset[i % binding.cpuset.len()]],
                "worker {i}"
            );
        }
    }

    #[test]
    fn pool_of_zero_threads_means_one_per_pu() {
        let binding = Binding::from_pus(PlacementPolicy::None, vec![]);
        assert_eq!(
            build_pool(0, &binding, true).unwrap().current_num_threads(),
            1
        );
        let binding = current_binding(PlacementPolicy::None).unwrap();
        assert_eq!(
            build_pool(0, &binding, true).unwrap().current_num_threads(),
            binding.cpuset.len()
        );
    }

    #[test]
    fn binding_to_a_pu_that_does_not_exist_is_an_error() {
        let binding = Binding::from_pus(PlacementPolicy::Compact, vec![1000]);
        assert!(matches!(
            build_pool(1, &binding, true),
            Err(PlaceError::BindThread { .. })
        ));
        assert!(matches!(
            bind_current_thread(&[5000]),
            Err(PlaceError::PuOutOfRange(5000))
        ));
    }

    const CHILD_VAR: &str = "CELLNET_PLACE_TEST_CHILD";

    /// Runs `apply` in a child process (binding the whole test process would
    /// change the other tests): instance 1 of 2, compact.
    #[test]
    fn apply_binds_the_process_to_its_plan() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "place::tests::apply_in_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_VAR, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("child bound to"), "{stdout}");
    }

    #[test]
    #[ignore = "run by apply_binds_the_process_to_its_plan in a child process"]
    fn apply_in_child() {
        assert_eq!(std::env::var(CHILD_VAR).as_deref(), Ok("1"));
        let topo = CpuTopology::detect().unwrap();
        let expected = plan(&topo, 1, 2, PlacementPolicy::Compact).unwrap();
        let binding = apply(PlacementPolicy::Compact, 1, 2).unwrap();
        assert_eq!(binding.cpuset, expected);
        assert_eq!(current_thread_pus().unwrap(), expected);
        // Policy none reports, and keeps, what is there.
        let kept = apply(PlacementPolicy::None, 0, 1).unwrap();
        assert_eq!(kept.cpuset, expected);
        assert!(matches!(
            apply(PlacementPolicy::Compact, 2, 2),
            Err(PlaceError::BadLocalRank { .. })
        ));
        println!("child bound to {}", binding.cpuset_string);
    }
}
