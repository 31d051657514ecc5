//! Persist relay node (being written: see the transport crate for now).
