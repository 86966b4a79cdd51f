//! The release before, upgraded in place: its WorkQueue shard streams retired and drained
//! (the drain itself is the shard worker's, `shard_worker/legacy.rs`), and its output stream,
//! which captured the digest subject itself, recreated with RePublish once its consumers
//! read it. Everything here runs only while such a deployment is being upgraded.

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::stream;
use async_nats::jetstream::Context;
use futures::StreamExt;

use super::topology::{durable_consumer, durables_names};
use super::{BusError, Topology};
use crate::config::TuningConfig;

impl Topology {
    /// The previous release's shard stream (WorkQueue), drained once by the upgrade.
    pub fn legacy_shard_stream(&self, shard: u16) -> String {
        format!("{}_{shard}", self.streams.shard_stream_prefix)
    }

    /// What a previous-release shard stream captures once the upgrade has taken the shard
    /// subjects from it: nothing anyone publishes to, so it only drains.
    pub(super) fn retired_subject(&self, shard: u16) -> String {
        format!("{}.retired.{shard}", self.streams.status_subject)
    }

    /// The previous release kept each shard in a WorkQueue stream, which deletes on ack and
    /// so cannot be replayed; JetStream cannot change a stream's retention in place. The
    /// upgrade takes the shard subjects from it (a subject change is allowed in place), so
    /// the new Limits stream can capture them and the old one receives nothing more; the
    /// shard's worker drains what it still holds, then deletes it
    /// (`shard_worker/legacy.rs`). Returns whether such a stream still exists.
    pub async fn retire_legacy_shard_stream(
        &self,
        js: &Context,
        shard: u16,
    ) -> Result<bool, BusError> {
        let name = self.legacy_shard_stream(shard);
        let Some(mut stream) = super::lookup_stream(js, &name).await? else {
            return Ok(false);
        };
        let info = stream
            .info()
            .await
            .map_err(|e| BusError::transient(format!("reading stream {name}"), e))?;
        let retired = vec![self.retired_subject(shard)];
        if info.config.subjects == retired {
            return Ok(true);
        }
        let update = stream::Config {
            subjects: retired,
            ..info.config.clone()
        };
        js.update_stream(&update)
            .await
            .map_err(|e| super::jetstream_error(format!("retiring stream {name}"), e))?;
        tracing::warn!(
            stream = %name,
            "the previous release's shard stream no longer captures the shard subjects; its \
             worker drains it into the shard's state, snapshots it, and deletes it"
        );
        Ok(true)
    }

    /// Whether the previous release's shard stream still exists (the shard is mid-upgrade).
    pub async fn legacy_shard_stream_exists(
        &self,
        js: &Context,
        shard: u16,
    ) -> Result<bool, BusError> {
        let name = self.legacy_shard_stream(shard);
        Ok(super::lookup_stream(js, &name).await?.is_some())
    }

    /// The release before RePublish had the output stream capture `digest_subject` itself.
    /// nats-server cannot add RePublish to an existing stream (error 10052), so such a stream
    /// is recreated: once every consumer of it has read and acknowledged everything (else this
    /// is a transient error naming them, retried until they have), it is deleted, created in
    /// the new shape, and its durable consumers are created again under the same names and
    /// settings, filters moved to the new subject. The digests it stored are gone with it; its
    /// consumers had read them all.
    pub(super) async fn migrate_previous_output(
        &self,
        js: &Context,
        wanted: &stream::Config,
    ) -> Result<(), BusError> {
        let name = &wanted.name;
        let previous = vec![self.streams.digest_subject.clone()];
        let Some(mut stream) = super::lookup_stream(js, name).await? else {
            return Ok(()); // Missing: ensure_stream creates it.
        };
        let info = stream
            .info()
            .await
            .map_err(|e| BusError::transient(format!("reading stream {name}"), e))?
            .clone();
        if info.config.subjects != previous || info.config.republish.is_some() {
            return Ok(());
        }
        let mut durables = Vec::new();
        let mut behind = Vec::new();
        let mut consumers = stream.consumers();
        while let Some(consumer) = consumers.next().await {
            let consumer = consumer
                .map_err(|e| BusError::transient(format!("listing consumers of {name}"), e))?;
            let unread = consumer.num_pending + consumer.num_ack_pending as u64;
            if unread > 0 {
                behind.push(format!("{} ({unread} unread)", consumer.name));
            }
            if consumer.config.durable_name.is_some() {
                durables.push(consumer.config);
            }
        }
        if !behind.is_empty() {
            return Err(BusError::transient(
                format!("migrating stream {name} to RePublish"),
                format!(
                    "waiting for its consumers to read what it holds: {}; the stream is \
                     recreated once they have (README, 'Upgrading')",
                    behind.join(", ")
                ),
            ));
        }
        // Another instance may have migrated it meanwhile: delete only the stream read above.
        let current = stream
            .info()
            .await
            .map_err(|e| BusError::transient(format!("reading stream {name}"), e))?;
        if current.created != info.created || current.config.republish.is_some() {
            return Ok(());
        }
        js.delete_stream(name).await.map_err(|e| {
            super::jetstream_error(format!("deleting stream {name} to recreate it"), e)
        })?;
        let created = match js.create_stream(wanted.clone()).await {
            Ok(created) => created,
            Err(error) if error.to_string().contains("already in use") => js
                .get_stream(name)
                .await
                .map_err(|e| BusError::transient(format!("opening stream {name}"), e))?,
            Err(error) => {
                return Err(super::jetstream_error(
                    format!("creating stream {name}"),
                    error,
                ))
            }
        };
        for mut consumer in durables {
            if consumer.filter_subject == self.streams.digest_subject {
                consumer.filter_subject = self.streams.output_subject.clone();
            }
            for filter in &mut consumer.filter_subjects {
                if *filter == self.streams.digest_subject {
                    *filter = self.streams.output_subject.clone();
                }
            }
            let durable = consumer.durable_name.clone().unwrap_or_default();
            if let Err(error) = created.create_consumer(consumer).await {
                tracing::error!(
                    stream = %name,
                    consumer = %durable,
                    %error,
                    "could not recreate a durable consumer of the migrated output stream; \
                     create it again by hand"
                );
            }
        }
        let recreated = durables_names(&created).await;
        tracing::warn!(
            stream = %name,
            consumers = ?recreated,
            "recreated the output stream with RePublish to {}: the service now publishes to \
             {}, and subscribers of {} receive each stored digest once",
            self.streams.digest_subject,
            self.streams.output_subject,
            self.streams.digest_subject
        );
        Ok(())
    }

    /// The previous release's consumer of its WorkQueue shard stream, for the upgrade's drain.
    pub async fn legacy_worker_consumer(
        &self,
        js: &Context,
        shard: u16,
        tuning: &TuningConfig,
    ) -> Result<PullConsumer, BusError> {
        let max_ack_pending = (tuning.worker_batch * 4).max(5_000);
        durable_consumer(
            js,
            &self.legacy_shard_stream(shard),
            &self.streams.worker_consumer,
            tuning,
            max_ack_pending,
        )
        .await
    }
}
