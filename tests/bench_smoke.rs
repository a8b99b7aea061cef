//! CI smoke test of `cellnet bench`: the whole suite in `--quick` mode
//! (starting its own mpirun jobs) writes JSON that parses and PNG plots
//! that are not empty. No timing is asserted: numbers from a shared CI
//! machine in a debug build mean nothing.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn out_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cellnet-bench-{tag}-{}", job_key()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn bench_all_quick_writes_parsable_json_and_plots() {
    let dir = out_dir("all");
    std::fs::create_dir_all(&dir).unwrap();
    // Output to files: pipes read only at the end could fill and block.
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let child = Command::new(BIN)
        .args(["bench", "all", "--quick", "--out"])
        .arg(&dir)
        .env("OMPI_MCA_btl_tcp_if_include", "lo")
        .env("OMPI_MCA_oob_tcp_if_include", "lo")
        .stdin(Stdio::null())
        .stdout(log("stdout.txt"))
        .stderr(log("stderr.txt"))
        .spawn()
        .expect("spawn cellnet bench");
    let out = wait(child, Duration::from_secs(240), "cellnet bench all --quick");
    let stdout = std::fs::read_to_string(dir.join("stdout.txt")).unwrap_or_default();
    let stderr = std::fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default();
    assert_eq!(out.code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for json in [
        "latency.json",
        "throughput.json",
        "discovery.json",
        "halo.json",
        "summary.json",
    ] {
        let text =
            std::fs::read_to_string(dir.join(json)).unwrap_or_else(|e| panic!("{json}: {e}"));
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{json} does not parse: {e}"));
        assert!(v.is_object(), "{json}");
    }
    let latency: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("latency.json")).unwrap()).unwrap();
    let names: Vec<&str> = latency["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "MPI",
            "ZeroMQ ipc",
            "ZeroMQ tcp",
            "cellnet ipc",
            "cellnet tcp"
        ],
        "all three transports run in the same job"
    );
    for s in latency["series"].as_array().unwrap() {
        assert_eq!(s["points"].as_array().unwrap().len(), 7, "8 B … 1 MiB");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let rows = summary["rows"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["target"].as_str().unwrap_or("").contains("halo")),
        "summary has the halo target: {summary}"
    );
    assert!(stdout.contains("summary: cellnet / baseline"), "{stdout}");
    for png in [
        "latency.png",
        "latency_p99.png",
        "throughput_msgs.png",
        "throughput_bw.png",
        "discovery.png",
        "halo.png",
    ] {
        let bytes = std::fs::read(dir.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(bytes.len() > 1000, "{png} is {} bytes", bytes.len());
        assert_eq!(&bytes[1..4], b"PNG", "{png} is a PNG");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_bad_input_is_one_line_and_exit_2() {
    let dir = out_dir("bad");
    let d = dir.to_string_lossy().to_string();
    for args in [
        vec!["bench", "nonsense"],
        vec!["bench", "latency", "--reps", "0"],
        vec!["bench", "latency", "--reps", "abc"],
        vec!["bench", "all", "--reps", "-3"],
        vec!["bench"],
    ] {
        let mut a = args.clone();
        a.extend(["--out", d.as_str()]);
        let out = run(&a, &[], Duration::from_secs(30));
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{args:?}: {}", out.stderr);
        if args.len() > 1 {
            assert_eq!(
                out.stderr.trim().lines().count(),
                1,
                "{args:?}: {}",
                out.stderr
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
