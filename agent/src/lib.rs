//! kspan: zero-code tracing agent. Data flows one way:
//! kernel events (`probes`) → connection tracking (`conntrack`) → protocol parsers (`protocols`)
//! → span builder (`spans`) → exporters (`export`). `process` decides which processes are traced
//! and describes them, with `kubernetes` for this node's pods; `pipeline` wires the stages
//! together.

pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conntrack;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod kubernetes;
pub mod linker;
pub mod metrics;
pub mod pipeline;
pub mod probes;
pub mod process;
pub mod protocols;
pub mod service_graph;
pub mod spans;
pub mod stats;
pub mod tls_writes;
pub mod top;
pub mod tracecontext;
