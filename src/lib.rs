//! cellnet: a communication layer for HPC jobs.

pub mod launch;
pub mod net;
pub mod place;
pub mod proto;
