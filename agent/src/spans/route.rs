//! Route templates (to be written).
