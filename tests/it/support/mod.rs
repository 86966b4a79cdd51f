//! Test harness: real nats-server processes and alarm-digest instances.

#![allow(dead_code)] // each test file uses a different part of the harness

pub mod nats;
pub mod service;
pub mod tools;

pub use nats::{NatsCluster, NatsServer};
pub use service::*;
