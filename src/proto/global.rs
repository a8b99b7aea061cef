//! global (in progress).
