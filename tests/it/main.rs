//! Integration tests: every test runs its own nats-server (random port, own store dir) and
//! talks to alarm-digest through the broker only, as producers and consumers do.

mod support;

mod artifacts;
mod cli;
mod clock;
mod cluster;
mod dead_letter;
mod delivery;
mod docs;
mod drills;
mod durability;
mod envelopes;
mod failover;
mod load_tool;
mod nemesis;
mod operations;
mod partitions;
mod placement;
mod security;
mod semantics;
mod server_upgrade;
mod shard_state;
