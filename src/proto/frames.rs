//! frames (in progress).
