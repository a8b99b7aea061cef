//! cellnet: a communication layer for HPC jobs.
//!
//! Instances launched by `mpirun` or Slurm find each other (node-local UDP
//! broadcast plus a ZeroMQ handshake), elect one leader per node, join a
//! global network through a coordinator, and then exchange *cells* point
//! to point with confirmed delivery (SEND → ACK/ERR, retransmission,
//! no duplicates) and frames handed over in order.
//!
//! Layers, each a module: [`launch`] (who am I) → [`place`] (hwloc
//! binding) → [`proto`] (sans-IO state machines) → [`net`] (UDP and
//! ZeroMQ) → [`runtime`] (I/O thread, rayon pool, the [`runtime::Communicator`])
//! → [`app`] (what the `cellnet` binary runs).

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
