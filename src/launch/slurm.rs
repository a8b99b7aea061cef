//! Slurm environment: pure parsers for Slurm's compressed host and task
//! lists, and [`from_slurm`], which turns the variables `srun` exports into a
//! [`LaunchInfo`]. Nothing here reads the real environment or calls Slurm.

use std::collections::HashMap;

use super::{
    job_key_override, optional_number, positive, required_number, LaunchError, LaunchInfo,
    LaunchSource,
};
use crate::proto::JobKey;

/// Upper bound on how many names or entries a compressed list may expand to.
/// Far above any real job (6,400 instances on 64 nodes), low enough that a
/// garbage value such as `n[0-99999999999]` cannot exhaust memory.
pub const MAX_EXPANDED: usize = 1 << 20;

/// Expands a Slurm host list such as `n[001-003,007],gpu5` into
/// `["n001", "n002", "n003", "n007", "gpu5"]`.
///
/// Zero padding of the lower bound is kept (`n[08-10]` gives `n08 n09 n10`).
/// Several bracket groups in one name expand as a product, as Slurm does:
/// `a[1-2]b[3-4]` gives `a1b3 a1b4 a2b3 a2b4`. Bad syntax is an error
/// (a `String` saying what is wrong), never a panic.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for item in split_top_level(list)? {
        if item.is_empty() {
            return Err("empty host name (stray comma?)".into());
        }
        expand_host(item, &mut names)?;
    }
    if names.is_empty() {
        return Err("no host names".into());
    }
    Ok(names)
}

/// Splits on commas that are not inside brackets; checks bracket nesting.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut depth = 0u32;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(format!("nested '[' at byte {i}")),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(format!("']' without '[' at byte {i}")),
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'[' is never closed".into());
    }
    items.push(&list[start..]);
    Ok(items)
}

/// Expands one host pattern (no top-level commas) and appends the names.
fn expand_host(pattern: &str, out: &mut Vec<String>) -> Result<(), String> {
    // Each part is a list of alternatives; the names are their product.
    let mut parts: Vec<Vec<String>> = Vec::new();
    let mut rest = pattern;
    while !rest.is_empty() {
        if let Some(inner) = rest.strip_prefix('[') {
            let close = inner.find(']').ok_or("'[' is never closed")?;
            parts.push(expand_ranges(&inner[..close])?);
            rest = &inner[close + 1..];
        } else {
            let end = rest.find('[').unwrap_or(rest.len());
            let text = &rest[..end];
            if let Some(c) = text.chars().find(|c| c.is_whitespace() || *c == ']') {
                return Err(format!("unexpected {c:?} in host name {pattern:?}"));
            }
            parts.push(vec![text.to_string()]);
            rest = &rest[end..];
        }
    }
    let mut names = vec![String::new()];
    for alternatives in parts {
        if names.len().saturating_mul(alternatives.len()) + out.len() > MAX_EXPANDED {
            return Err(format!("expands to more than {MAX_EXPANDED} names"));
        }
        names = names
            .iter()
            .flat_map(|prefix| alternatives.iter().map(move |a| format!("{prefix}{a}")))
            .collect();
    }
    out.extend(names);
    Ok(())
}

/// Expands the inside of one bracket group: `001-003,007`.
fn expand_ranges(ranges: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for range in ranges.split(',') {
        let (lo, hi) = match range.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (range, range),
        };
        let width = lo.len();
        let lo_n = parse_index(lo, ranges)?;
        let hi_n = parse_index(hi, ranges)?;
        if lo_n > hi_n {
            return Err(format!("range {range:?} runs backwards"));
        }
        if (hi_n - lo_n) as usize >= MAX_EXPANDED - out.len().min(MAX_EXPANDED) {
            return Err(format!("expands to more than {MAX_EXPANDED} names"));
        }
        out.extend((lo_n..=hi_n).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

fn parse_index(digits: &str, group: &str) -> Result<u64, String> {
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{digits:?} in [{group}] is not a host index"));
    }
    digits
        .parse()
        .map_err(|_| format!("{digits:?} in [{group}] is not a host index"))
}

/// Expands Slurm's tasks-per-node list: `2(x3),1` gives `[2, 2, 2, 1]`.
pub fn expand_tasks_per_node(list: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for item in list.split(',') {
        let (count, repeat) = match item.split_once('(') {
            None => (item, 1),
            Some((count, tail)) => {
                let times = tail
                    .strip_prefix('x')
                    .and_then(|t| t.strip_suffix(')'))
                    .ok_or_else(|| format!("{item:?} is not of the form N(xM)"))?;
                let times: usize = parse_small(times)
                    .ok_or_else(|| format!("repeat count in {item:?} is not a number"))?;
                (count, times)
            }
        };
        let count = parse_small(count)
            .and_then(|c| u32::try_from(c).ok())
            .ok_or_else(|| format!("{item:?} does not start with a task count"))?;
        if repeat == 0 {
            return Err(format!("{item:?} repeats zero times"));
        }
        if out.len() + repeat > MAX_EXPANDED {
            return Err(format!("expands to more than {MAX_EXPANDED} nodes"));
        }
        out.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(out)
}

fn parse_small(digits: &str) -> Option<usize> {
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Reads the first of several variables that is set (Slurm exports step
/// values under `SLURM_STEP_*` and job values under the plain names; inside
/// an allocation a step may use fewer tasks or nodes than the job).
fn first_set<'a>(
    vars: &'a HashMap<String, String>,
    names: &[&'static str],
) -> Option<(&'static str, &'a str)> {
    names
        .iter()
        .find_map(|n| vars.get(*n).map(|v| (*n, v.as_str())))
}

fn required<'a>(
    vars: &'a HashMap<String, String>,
    names: &[&'static str],
) -> Result<(&'static str, &'a str), LaunchError> {
    first_set(vars, names).ok_or(LaunchError::Missing {
        var: names[0],
        context: "the Slurm launcher",
    })
}

/// Builds a [`LaunchInfo`] from the variables `srun` exports to each task.
///
/// Reads `SLURM_PROCID`, `SLURM_NTASKS` (or `SLURM_STEP_NUM_TASKS`),
/// `SLURM_LOCALID`, `SLURM_NODEID`, `SLURM_NNODES` (or
/// `SLURM_STEP_NUM_NODES`), `SLURM_TASKS_PER_NODE` (or
/// `SLURM_STEP_TASKS_PER_NODE`), `SLURM_JOB_NODELIST` (or
/// `SLURM_STEP_NODELIST`, `SLURM_NODELIST`), `SLURMD_NODENAME`,
/// `SLURM_JOB_ID` (or `SLURM_JOBID`) and `SLURM_STEP_ID`. The job key is a
/// hash of job id and step id unless `CELLNET_JOB_KEY` overrides it.
pub fn from_slurm(vars: &HashMap<String, String>) -> Result<LaunchInfo, LaunchError> {
    let rank = required_number(vars, "SLURM_PROCID", "the Slurm launcher")?;
    let (ntasks_var, ntasks_value) = required(vars, &["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"])?;
    let size = positive(ntasks_var, ntasks_value)?;
    let (nnodes_var, nnodes_value) = required(vars, &["SLURM_STEP_NUM_NODES", "SLURM_NNODES"])?;
    let nodes = positive(nnodes_var, nnodes_value)?;
    let local_rank = optional_number(vars, "SLURM_LOCALID")?;
    let node_index = optional_number(vars, "SLURM_NODEID")?;
    let (local_rank, node_index) = match (local_rank, node_index) {
        (Some(l), Some(n)) => (l, n),
        _ if nodes == 1 => (rank, 0),
        _ => {
            return Err(LaunchError::Missing {
                var: if local_rank.is_none() {
                    "SLURM_LOCALID"
                } else {
                    "SLURM_NODEID"
                },
                context: "a Slurm job on more than one node",
            })
        }
    };
    check_below("SLURM_PROCID", rank, ntasks_var, size)?;
    check_below("SLURM_NODEID", node_index, nnodes_var, nodes)?;

    let (tpn_var, tpn_value) =
        required(vars, &["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"])?;
    let per_node =
        expand_tasks_per_node(tpn_value).map_err(|reason| LaunchError::BadTasksPerNode {
            var: tpn_var,
            value: tpn_value.to_string(),
            reason,
        })?;
    check_count(
        tpn_var,
        tpn_value,
        per_node.len(),
        "nodes",
        nnodes_var,
        nodes,
    )?;
    let total: u64 = per_node.iter().map(|&n| u64::from(n)).sum();
    check_count(
        tpn_var,
        tpn_value,
        total as usize,
        "tasks",
        ntasks_var,
        size,
    )?;
    let local_size = per_node[node_index as usize];
    if local_rank >= local_size {
        return Err(LaunchError::NotBelow {
            var: "SLURM_LOCALID",
            value: local_rank.to_string(),
            limit_var: tpn_var,
            limit: format!("{tpn_value} (node {node_index} runs {local_size} tasks)"),
        });
    }

    let node_list = match first_set(
        vars,
        &[
            "SLURM_STEP_NODELIST",
            "SLURM_JOB_NODELIST",
            "SLURM_NODELIST",
        ],
    ) {
        Some((var, value)) => {
            let list = expand_nodelist(value).map_err(|reason| LaunchError::BadNodeList {
                var,
                value: value.to_string(),
                reason,
            })?;
            check_count(var, value, list.len(), "nodes", nnodes_var, nodes)?;
            list
        }
        None => Vec::new(),
    };
    let node_name = match vars.get("SLURMD_NODENAME").filter(|n| !n.is_empty()) {
        Some(name) => name.clone(),
        None => match node_list.get(node_index as usize) {
            Some(name) => name.clone(),
            None => super::hostname(),
        },
    };

    let job_id = first_set(vars, &["SLURM_JOB_ID", "SLURM_JOBID"]).map(|(_, v)| v);
    let step_id = vars.get("SLURM_STEP_ID").map(String::as_str);
    let job_key = match job_key_override(vars)? {
        Some(key) => key,
        None => slurm_job_key(job_id.unwrap_or(""), step_id.unwrap_or("")),
    };

    Ok(LaunchInfo {
        rank,
        size,
        node_name,
        node_index,
        local_rank,
        local_size,
        nodes,
        job_key,
        source: LaunchSource::Slurm,
        node_list,
    })
}

/// The job key of a Slurm step: the same on every task of the step, different
/// for two steps of one job running side by side.
pub fn slurm_job_key(job_id: &str, step_id: &str) -> JobKey {
    JobKey(super::fnv1a64(
        format!("slurm:{job_id}.{step_id}").as_bytes(),
    ))
}

fn check_below(
    var: &'static str,
    value: u32,
    limit_var: &'static str,
    limit: u32,
) -> Result<(), LaunchError> {
    if value < limit {
        return Ok(());
    }
    Err(LaunchError::NotBelow {
        var,
        value: value.to_string(),
        limit_var,
        limit: limit.to_string(),
    })
}

fn check_count(
    var: &'static str,
    value: &str,
    found: usize,
    what: &'static str,
    expected_var: &'static str,
    expected: u32,
) -> Result<(), LaunchError> {
    if found == expected as usize {
        return Ok(());
    }
    Err(LaunchError::CountMismatch {
        var,
        value: value.to_string(),
        found,
        what,
        expected_var,
        expected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::tests::vars;

    /// What `srun -N4 -n7` exports to task 4 (third node, second task there).
    fn four_node_job() -> HashMap<String, String> {
        vars(&[
            ("SLURM_PROCID", "4"),
            ("SLURM_NTASKS", "7"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "2"),
            ("SLURM_NNODES", "4"),
            ("SLURM_TASKS_PER_NODE", "2(x3),1"),
            ("SLURM_JOB_NODELIST", "n[001-003],gpu5"),
            ("SLURMD_NODENAME", "n003"),
            ("SLURM_JOB_ID", "4242"),
            ("SLURM_STEP_ID", "0"),
        ])
    }

    #[test]
    fn nodelist_keeps_padding_and_mixes_groups() {
        assert_eq!(
            expand_nodelist("n[001-003,007],gpu5").unwrap(),
            ["n001", "n002", "n003", "n007", "gpu5"]
        );
        assert_eq!(expand_nodelist("n[08-10]").unwrap(), ["n08", "n09", "n10"]);
        assert_eq!(expand_nodelist("host").unwrap(), ["host"]);
        assert_eq!(
            expand_nodelist("n[1-2]-ib,x[5]").unwrap(),
            ["n1-ib", "n2-ib", "x5"]
        );
        assert_eq!(expand_nodelist("n[001-064]").unwrap().len(), 64);
    }

    #[test]
    fn nodelist_with_two_groups_is_a_product() {
        assert_eq!(
            expand_nodelist("a[1-2]b[3-4]").unwrap(),
            ["a1b3", "a1b4", "a2b3", "a2b4"]
        );
    }

    #[test]
    fn bad_nodelists_are_errors() {
        for bad in [
            "n[001-",
            "n[3-1]",
            "n[a-b]",
            "n[]",
            "n[1,]",
            "",
            "a,,b",
            "n]1[",
            "n[[1]]",
            "a b",
            "n[0-99999999999]",
        ] {
            assert!(expand_nodelist(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn tasks_per_node_expands_repeats() {
        assert_eq!(expand_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        assert_eq!(expand_tasks_per_node("4(x16),2").unwrap().len(), 17);
        assert_eq!(expand_tasks_per_node("1").unwrap(), [1]);
        for bad in [
            "2(x)", "2(3)", "(x3)", "", "2(x3", "x", "2,,1", "2(x0)", "-1",
        ] {
            assert!(expand_tasks_per_node(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn four_node_job_gives_node_and_local_rank() {
        let info = from_slurm(&four_node_job()).unwrap();
        assert_eq!((info.rank, info.size), (4, 7));
        assert_eq!((info.node_index, info.nodes), (2, 4));
        assert_eq!((info.local_rank, info.local_size), (0, 2));
        assert_eq!(info.node_name, "n003");
        assert_eq!(info.node_list, ["n001", "n002", "n003", "gpu5"]);
        assert_eq!(info.source, LaunchSource::Slurm);
        assert_eq!(info.job_key, slurm_job_key("4242", "0"));
    }

    #[test]
    fn last_node_has_its_own_local_size_and_name_from_list() {
        let mut env = four_node_job();
        env.insert("SLURM_PROCID".into(), "6".into());
        env.insert("SLURM_NODEID".into(), "3".into());
        env.remove("SLURMD_NODENAME");
        let info = from_slurm(&env).unwrap();
        assert_eq!((info.local_rank, info.local_size), (0, 1));
        assert_eq!(info.node_name, "gpu5");
    }

    #[test]
    fn job_key_separates_steps_and_is_overridable() {
        let a = from_slurm(&four_node_job()).unwrap().job_key;
        let mut env = four_node_job();
        env.insert("SLURM_STEP_ID".into(), "1".into());
        assert_ne!(a, from_slurm(&env).unwrap().job_key);
        env.insert("CELLNET_JOB_KEY".into(), "0x10".into());
        assert_eq!(from_slurm(&env).unwrap().job_key, JobKey(16));
    }

    #[test]
    fn step_variables_win_over_job_variables() {
        let mut env = four_node_job();
        env.insert("SLURM_STEP_NUM_TASKS".into(), "5".into());
        env.insert("SLURM_STEP_NUM_NODES".into(), "3".into());
        env.insert("SLURM_STEP_TASKS_PER_NODE".into(), "2,2,1".into());
        env.insert("SLURM_STEP_NODELIST".into(), "n[001-003]".into());
        let info = from_slurm(&env).unwrap();
        assert_eq!((info.size, info.nodes, info.local_size), (5, 3, 1));
        assert_eq!(info.node_list, ["n001", "n002", "n003"]);
    }

    #[test]
    fn inconsistent_slurm_values_name_the_variables() {
        let mut env = four_node_job();
        env.insert("SLURM_PROCID".into(), "7".into());
        let err = from_slurm(&env).unwrap_err();
        assert!(matches!(
            err,
            LaunchError::NotBelow {
                var: "SLURM_PROCID",
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "SLURM_PROCID=7 is not below SLURM_NTASKS=7"
        );

        let mut env = four_node_job();
        env.insert("SLURM_TASKS_PER_NODE".into(), "2(x3)".into());
        let err = from_slurm(&env).unwrap_err();
        assert!(matches!(
            err,
            LaunchError::CountMismatch {
                var: "SLURM_TASKS_PER_NODE",
                ..
            }
        ));
        assert!(err.to_string().contains("SLURM_NNODES=4"), "{err}");

        let mut env = four_node_job();
        env.insert("SLURM_TASKS_PER_NODE".into(), "2(x)".into());
        assert!(matches!(
            from_slurm(&env).unwrap_err(),
            LaunchError::BadTasksPerNode { .. }
        ));

        let mut env = four_node_job();
        env.insert("SLURM_JOB_NODELIST".into(), "n[001-".into());
        let err = from_slurm(&env).unwrap_err();
        assert!(matches!(
            err,
            LaunchError::BadNodeList {
                var: "SLURM_JOB_NODELIST",
                ..
            }
        ));
        assert!(
            err.to_string().contains("SLURM_JOB_NODELIST=n[001-"),
            "{err}"
        );

        let mut env = four_node_job();
        env.insert("SLURM_LOCALID".into(), "2".into());
        assert!(matches!(
            from_slurm(&env).unwrap_err(),
            LaunchError::NotBelow {
                var: "SLURM_LOCALID",
                ..
            }
        ));

        let mut env = four_node_job();
        env.remove("SLURM_NTASKS");
        assert!(matches!(
            from_slurm(&env).unwrap_err(),
            LaunchError::Missing {
                var: "SLURM_STEP_NUM_TASKS",
                ..
            }
        ));
    }

    mod never_panic {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn nodelist_parser(s in ".{0,40}") {
                let _ = expand_nodelist(&s);
            }

            #[test]
            fn nodelist_parser_on_plausible_input(s in "[a-c0-9\\[\\],\\-]{0,30}") {
                let _ = expand_nodelist(&s);
            }

            #[test]
            fn tasks_per_node_parser(s in "[0-9x(),]{0,30}") {
                let _ = expand_tasks_per_node(&s);
            }

            #[test]
            fn from_slurm_on_arbitrary_values(
                procid in "[0-9a]{0,3}", ntasks in "[0-9]{0,3}", tpn in "[0-9x(),]{0,12}",
                nodelist in "[a-c0-9\\[\\],\\-]{0,16}", nodeid in "[0-9]{0,2}",
            ) {
                let env = vars(&[
                    ("SLURM_PROCID", &procid), ("SLURM_NTASKS", &ntasks),
                    ("SLURM_NNODES", "2"), ("SLURM_LOCALID", "0"), ("SLURM_NODEID", &nodeid),
                    ("SLURM_TASKS_PER_NODE", &tpn), ("SLURM_JOB_NODELIST", &nodelist),
                ]);
                let _ = from_slurm(&env);
            }
        }
    }
}
