//! HTTP span builder (to be written).
