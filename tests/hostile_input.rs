//! Junk on the wire is dropped and counted, never trusted, and discovery
//! still completes: junk and forged datagrams on the discovery port, and
//! garbage ZeroMQ messages on an instance's receiving socket.

mod common;
use common::shutdown_all;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use cellnet::config::Config;
use cellnet::launch::{LaunchInfo, LaunchSource};
use cellnet::net::udp::UdpEndpoint;
use cellnet::place::PlacementPolicy;
use cellnet::proto::wire::{self, Datagram, JobSecret};
use cellnet::proto::JobKey;
use cellnet::runtime::Communicator;

fn free_port() -> u16 {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn info(rank: u32, key: JobKey) -> LaunchInfo {
    LaunchInfo {
        rank,
        size: 2,
        node_name: "n0".into(),
        node_index: 0,
        local_rank: rank,
        local_size: 2,
        nodes: 1,
        job_key: key,
        source: LaunchSource::Explicit,
        node_list: Vec::new(),
    }
}

#[test]
fn junk_datagrams_and_garbage_frames_are_counted_and_discovery_completes() {
    let port = free_port();
    let key = JobKey(0xC0FFEE ^ port as u64);
    let secret = b"test-secret".to_vec();
    let config = Config {
        placement: PlacementPolicy::None,
        threads: 1,
        discovery_port: port,
        coordinator: Some(format!("127.0.0.1:{}", free_port())),
        secret: Some(secret.clone()),
        join_timeout: Duration::from_secs(30),
        ..Config::default()
    };

    // Listen on the discovery port too, to learn rank 0's endpoint from its Ping.
    let spy = UdpEndpoint::discovery(port).unwrap();
    let a_config = config.clone();
    let a = std::thread::spawn(move || {
        Communicator::builder()
            .config(a_config)
            .launch_info(info(0, key))
            .start()
    });

    let secret_key = JobSecret::new(secret.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 70_000];
    let endpoint = loop {
        assert!(Instant::now() < deadline, "no ping from rank 0");
        if let Some(bytes) = spy.try_recv(&mut buf).unwrap() {
            if let Ok(Datagram::Ping(p)) = wire::decode_datagram(key, &secret_key, bytes) {
                break p.info.endpoints.tcp;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    };

    // Junk datagrams, broadcast on the node-local address.
    let to = SocketAddrV4::new(Ipv4Addr::new(127, 255, 255, 255), port);
    let sender = UdpEndpoint::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
    for (_, junk) in common::junk_datagrams(key, &secret) {
        sender.send_to(&junk, to).unwrap();
    }

    // Garbage on rank 0's receiving socket.
    let ctx = zmq::Context::new();
    let dealer = ctx.socket(zmq::DEALER).unwrap();
    dealer.set_linger(0).unwrap();
    dealer.connect(&endpoint).unwrap();
    dealer.send("garbage", 0).unwrap();
    dealer
        .send_multipart([&b"\x11\xce\x01\x01"[..], b"x"], 0)
        .unwrap();
    dealer
        .send_multipart([&[0u8; 36][..], b"", b""], 0)
        .unwrap();

    // Give rank 0 a moment to read them, then start rank 1.
    std::thread::sleep(Duration::from_millis(300));
    let b = Communicator::builder()
        .config(config)
        .launch_info(info(1, key))
        .start()
        .expect("rank 1 starts");
    let a = a
        .join()
        .unwrap()
        .expect("rank 0 completes despite the junk");

    assert_eq!(a.leader(), Some(0));
    assert_eq!(b.leader(), Some(0));
    assert_eq!(a.local_peers(), vec![0, 1]);
    let m = a.metrics();
    assert!(m.datagrams_malformed >= 2, "{m:?}");
    assert!(m.datagrams_bad_tag >= 1, "{m:?}");
    assert!(m.datagrams_foreign_job >= 1, "{m:?}");
    assert!(m.zmq_malformed >= 3, "{m:?}");
    let line = cellnet::app::probe::line(&a);
    assert!(
        line.contains(&format!("zmq-malformed={}", m.zmq_malformed)),
        "{line}"
    );

    // And the two still exchange cells with ACKs both ways.
    a.expect_from([1]).unwrap();
    b.expect_from([0]).unwrap();
    let ta = a.send(1, 0, vec![1u8; 10]).unwrap();
    let tb = b.send(0, 0, vec![2u8; 10]).unwrap();
    a.end_frame(0, &[1]).unwrap();
    b.end_frame(0, &[0]).unwrap();
    assert_eq!(
        a.recv_frame(Duration::from_secs(10)).unwrap()[&1],
        vec![bytes::Bytes::from(vec![2u8; 10])]
    );
    assert_eq!(
        b.recv_frame(Duration::from_secs(10)).unwrap()[&0],
        vec![bytes::Bytes::from(vec![1u8; 10])]
    );
    assert!(ta.wait().unwrap().is_ack());
    assert!(tb.wait().unwrap().is_ack());
    shutdown_all(vec![a, b]);
}
