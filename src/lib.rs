//! cellnet: a communication layer for HPC jobs.
//!
//! Instances launched by `mpirun` or Slurm find each other (node-local UDP
//! broadcast plus a ZeroMQ handshake), elect one leader per node, join a
//! global network through a coordinator, and then exchange *cells* point
//! to point with confirmed delivery (SEND → ACK/ERR, retransmission,
//! no duplicates) and frames handed over in order.
//!
//! A complete small program (it runs as a doc test: one instance on its
//! own; under `mpirun -n 8` or `srun` the same code runs on every rank):
//!
//! ```
//! use std::time::Duration;
//! use cellnet::{config::Config, launch::LaunchMode, partition::Partition2d, place::PlacementPolicy};
//! use cellnet::runtime::Communicator;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config {
//!     launch: LaunchMode::Single,           // default Auto: MPI, Slurm or CELLNET_* variables
//!     placement: PlacementPolicy::None,
//!     discovery_port: 0,                    // any free port: this job is one instance
//!     coordinator: Some("127.0.0.1:0".into()),
//!     ..Config::default()
//! };
//! // Get a communicator: launch, pinning, discovery, leader, global ready.
//! let comm = Communicator::builder().config(config).handler(|_cell| Ok(())).start()?;
//!
//! // Who owns what, and whom this instance exchanges halos with.
//! let grid = Partition2d::new([64, 64], comm.size())?;
//! let neighbours = grid.neighbour_ranks(comm.rank());
//! comm.expect_from(neighbours.iter().copied())?;
//!
//! // Exchange one frame: a cell to every neighbour, then the frame end.
//! let block = grid.block(comm.rank());
//! let mut tickets = Vec::new();
//! for &n in &neighbours {
//!     tickets.push(comm.send(n, 0, vec![0u8; block.len[1]])?);
//! }
//! tickets.extend(comm.end_frame(0, &neighbours)?);
//! let frame = comm.recv_frame(Duration::from_secs(10))?; // every neighbour's cells of frame 0
//! assert_eq!(frame.len(), neighbours.len());
//! for t in tickets {
//!     assert!(t.wait()?.is_ack());
//! }
//!
//! // A collective over all instances, then a draining shutdown.
//! let cells = comm.all_reduce_sum(block.cells() as u64, Duration::from_secs(10))?;
//! assert_eq!(cells, 64 * 64);
//! let report = comm.shutdown()?;
//! assert_eq!(report.sent, report.acknowledged + report.refused);
//! # Ok(())
//! # }
//! ```
//!
//! Layers, each a module: [`launch`] (who am I) → [`place`] (hwloc
//! binding) → [`proto`] (sans-IO state machines) → [`net`] (UDP and
//! ZeroMQ) → [`runtime`] (I/O thread, rayon pool, the [`runtime::Communicator`])
//! → [`app`] (what the `cellnet` binary runs).

#![warn(missing_docs)]

pub mod app;
pub mod config;
pub mod launch;
pub mod net;
pub mod partition;
pub mod place;
pub mod proto;
pub mod runtime;
pub mod sim;

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
