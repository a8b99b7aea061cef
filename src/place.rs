//! place (in progress).
