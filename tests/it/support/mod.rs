//! Test harness, split by what each part owns: broker processes (`nats.rs`), service
//! instances in this process (`service.rs`) or as the real binary (`process.rs`), the
//! producer and notification side (`client.rs`), digest readers (`digests.rs`), and the
//! operator tools (`tools.rs`).

pub mod client;
pub mod digests;
pub mod nats;
pub mod process;
pub mod service;
pub mod tools;

pub use alarm_digest::http::get as http_get;
pub use client::*;
pub use digests::*;
pub use nats::{NatsCluster, NatsServer};
pub use process::*;
pub use service::*;
