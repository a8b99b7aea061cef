//! `app`: what the `cellnet` binary runs — the main job (`life`) and the
//! probe. Library code, so tests can drive it too.

pub mod bench;
pub mod checkpoint;
pub mod collectives;
pub mod life;
pub mod probe;
pub mod stress;
