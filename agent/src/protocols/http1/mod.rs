//! HTTP/1.x parser (to be written).
