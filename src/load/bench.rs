//! The `alarm-digest bench` run against a deployment: connect, then each phase asked for
//! (broker ceiling, naive single hop, ingest, digest latency) measured in turn, with the CPU
//! each process spends per event, and the service's footprint at the end.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::producer::{Producer, ProducerOptions, ProducerStats};
use super::{ceiling, naive, Workload};
use crate::bus::{self, Topology};
use crate::config::Config;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Status changes to publish.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Distinct users.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
    /// Alarms per user.
    #[arg(long, default_value_t = 10)]
    pub alarms: u64,
    /// Events per second to publish (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Digest requests to send after ingest has drained.
    #[arg(long, default_value_t = 2_000)]
    pub digests: u64,
    /// Digest requests per second (0: as fast as the broker takes them), each timed from its
    /// own publish to its digest's first part.
    #[arg(long, default_value_t = 500)]
    pub digest_rate: u64,
    /// Events per second to keep publishing while digests are measured (0: ingest idle).
    #[arg(long, default_value_t = 0)]
    pub background_rate: u64,
    /// First measure the broker alone doing the same work (zero processing), same server.
    #[arg(long)]
    pub broker_ceiling: bool,
    /// First measure the naive single-hop durable design on the same server: one consumer of
    /// the input, each event written, flushed to disk and acked on its own.
    #[arg(long)]
    pub naive: bool,
    /// The service's pid for RSS (default: the one local `alarm-digest run`, if any).
    #[arg(long)]
    pub service_pid: Option<u32>,
    /// The broker's pid, to report the CPU it spends per event (when it is local); for a
    /// cluster, every node's, comma-separated (summed).
    #[arg(long, value_delimiter = ',')]
    pub broker_pid: Vec<u32>,
    /// The service's data dir for bytes per alarm (default: storage.path).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Give up waiting after this long in all.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// Fail when the deployment makes no progress for this long: nothing acknowledged by
    /// the broker, nothing more drained, no digest arriving.
    #[arg(long, default_value_t = 30)]
    pub give_up_secs: u64,
    /// Publishes waiting for their PubAck at once, per producer.
    #[arg(long, default_value_t = 2048)]
    pub window: usize,
    /// Producer connections publishing the events at once, each its share of them (enough
    /// that the tool is not the limit; the input partition count comes from the config).
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
}

/// One bench run: its connections, producers and meters.
struct Bench<'a> {
    config: &'a Config,
    args: &'a BenchArgs,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    /// The first producer, on the control connection.
    producer: Producer,
    producers: Vec<Producer>,
    workload: Workload,
    /// The whole run's limit, and how long nothing may move.
    timeout: Duration,
    give_up: Duration,
    service_pid: Option<u32>,
    meter: CpuMeter,
}

/// Runs the bench; exit 130 when interrupted while connecting.
pub async fn run(config: Config, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let Some(bench) = Bench::connect(&config, args).await? else {
        return Ok(ExitCode::from(130));
    };
    bench.print_header();
    let ceiling = bench.ceiling().await?;
    let naive = bench.naive().await?;
    bench.ingest(ceiling, naive).await?;
    bench.digests().await?;
    bench.footprint();
    Ok(ExitCode::SUCCESS)
}

impl<'a> Bench<'a> {
    /// The control connection (streams ensured) and the producers, each on its own
    /// connection but the first; `None` if interrupted.
    async fn connect(config: &'a Config, args: &'a BenchArgs) -> anyhow::Result<Option<Self>> {
        let Some(client) = bus::connect(&config.nats, &CancellationToken::new()).await? else {
            return Ok(None);
        };
        let js = async_nats::jetstream::new(client.clone());
        Topology::new(config.streams.clone(), config.shards.count)
            .ensure_streams(&js)
            .await?;
        let give_up = Duration::from_secs(args.give_up_secs.max(1));
        let options = ProducerOptions {
            window: args.window.max(1),
            give_up_after: give_up,
            ..ProducerOptions::default()
        };
        let stats = Arc::new(ProducerStats::default());
        let producer = Producer::new(&client, options, stats.clone());
        let mut producers = vec![producer.clone()];
        for _ in 1..args.producers.max(1) {
            let Some(own) = bus::connect(&config.nats, &CancellationToken::new()).await? else {
                return Ok(None);
            };
            producers.push(Producer::new(&own, options, stats.clone()));
        }
        let service_pid = args.service_pid.or_else(super::find_service_pid);
        Ok(Some(Bench {
            config,
            args,
            client,
            js,
            producer,
            producers,
            workload: Workload {
                events: args.events,
                users: args.users.max(1),
                alarms: args.alarms.max(1),
            },
            timeout: Duration::from_secs(args.timeout_secs),
            give_up,
            service_pid,
            meter: CpuMeter::new(&args.broker_pid, service_pid),
        }))
    }

    fn print_header(&self) {
        let (workload, config) = (&self.workload, self.config);
        let rate = match self.args.rate {
            0 => "max".to_string(),
            rate => rate.to_string(),
        };
        println!(
            "alarm-digest bench  {}  events={} users={} alarms={} rate={rate} shards={} input_partitions={} producers={}",
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
            workload.events,
            workload.users,
            workload.alarms,
            config.shards.count,
            config.streams.input_partitions,
            self.producers.len(),
        );
    }

    /// The broker alone doing the same work, when asked: its rate and CPU per event.
    async fn ceiling(&self) -> anyhow::Result<Option<(f64, f64)>> {
        if !self.args.broker_ceiling || self.workload.events == 0 {
            return Ok(None);
        }
        let limits = (self.timeout, self.give_up);
        let run = ceiling::measure(
            &self.producers,
            self.config,
            &self.workload,
            self.args.rate,
            limits,
        );
        let compared = self.compare(
            "broker ceiling  ",
            "(input stream → router hop in envelopes → shard streams → ack, no processing)",
            "the bench process: producer, zero-work router and consumers",
            run,
        );
        Ok(Some(compared.await?))
    }

    /// The naive single-hop design on the same server, when asked: its rate.
    async fn naive(&self) -> anyhow::Result<Option<f64>> {
        if !self.args.naive || self.workload.events == 0 {
            return Ok(None);
        }
        let limits = (self.timeout, self.give_up);
        let run = naive::measure(
            &self.producer,
            self.config,
            &self.workload,
            self.args.rate,
            limits,
        );
        let compared = self.compare(
            "naive single hop",
            "(one consumer: decode, write, flush, ack each event)",
            "the bench process: producer, naive consumer",
            run,
        );
        Ok(Some(compared.await?.0))
    }

    /// Runs one comparison and prints its rate and CPU per event; returns both.
    async fn compare(
        &self,
        label: &str,
        what: &str,
        bench_is: &str,
        run: impl std::future::Future<Output = anyhow::Result<Duration>>,
    ) -> anyhow::Result<(f64, f64)> {
        let cpu = self.meter.start();
        let elapsed = run.await?;
        let rate = report_rate(label, self.workload.events, elapsed, what);
        let cpu = self.meter.report(&cpu, self.workload.events, bench_is);
        Ok((rate, cpu))
    }

    /// Publishes the events and waits until the service drained them: the ingest rate, set
    /// against the ceiling and the naive design when they were measured.
    async fn ingest(&self, ceiling: Option<(f64, f64)>, naive: Option<f64>) -> anyhow::Result<()> {
        let (config, workload) = (self.config, &self.workload);
        if workload.events == 0 {
            return Ok(());
        }
        let inputs = super::input_streams(config);
        let first = super::inputs_stored(&self.js, &inputs).await?;
        let cpu = self.meter.start();
        let started = Instant::now();
        // Producers publish the plain subject, as producers do: the server's mapping spreads
        // it over the partitions.
        let subject = |_| config.streams.status_subject.clone();
        let progress = super::report_progress(&self.producer, workload.events);
        let published = super::publish_spread(
            &self.producers,
            self.producers.len(),
            subject,
            workload,
            0..workload.events,
            self.args.rate,
        )
        .await;
        progress.abort();
        published?;
        let consumers = super::service_consumers(config);
        let limits = (self.timeout, self.give_up);
        super::wait_drained(
            &self.js,
            (&inputs, first + workload.events),
            &consumers,
            limits,
        )
        .await?;
        let elapsed = started.elapsed();
        let per_second = workload.events as f64 / elapsed.as_secs_f64();
        let mut ratio = ceiling
            .map(|(c, _)| format!("  = {:.2} of the broker ceiling", per_second / c))
            .unwrap_or_default();
        if let Some(naive) = naive {
            ratio += &format!("  = {:.1}x the naive single hop", per_second / naive);
        }
        println!(
            "ingest           {:>9} evts in {:>7.2} s = {:>8.0} events/s{ratio}",
            workload.events,
            elapsed.as_secs_f64(),
            per_second
        );
        let cpu = self
            .meter
            .report(&cpu, workload.events, "the bench process: producer");
        if let Some((_, ceiling_cpu)) = ceiling.filter(|_| cpu > 0.0) {
            println!(
                "  cpu per event: the ceiling's is {:.2} of this (the rate ratio when the machine is CPU-bound)",
                ceiling_cpu / cpu
            );
        }
        Ok(())
    }

    /// Digest requests at the asked rate, each timed from its own publish to its first
    /// part, beside background ingest when asked.
    async fn digests(&self) -> anyhow::Result<()> {
        let (args, workload) = (self.args, self.workload);
        if args.digests == 0 {
            return Ok(());
        }
        let background = (args.background_rate > 0).then(|| {
            let seconds = args.digests / args.digest_rate.max(1) + 3;
            let range = workload.events..workload.events + args.background_rate * seconds;
            let producer = self.producer.clone();
            let subject = self.config.streams.status_subject.clone();
            let rate = args.background_rate;
            tokio::spawn(async move {
                super::publish_events(&producer, &subject, &workload, range, rate).await
            })
        });
        let digests_started = Instant::now();
        let latencies = super::digest_latencies(
            &self.client,
            &self.producer,
            self.config,
            &workload,
            (args.digests, args.digest_rate),
            self.give_up,
        )
        .await?;
        if let Some(background) = background {
            background.abort();
        }
        let [p50, p90, p99, max] = super::percentiles(latencies);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let during = match args.background_rate {
            0 => "  (ingest idle)".to_string(),
            rate => format!("  (ingest running at {rate}/s)"),
        };
        let answered_in = digests_started.elapsed().as_secs_f64();
        println!(
            "digest latency   {:>9} reqs at {}/s: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms{during}",
            args.digests,
            args.digest_rate,
            ms(p50),
            ms(p90),
            ms(p99),
            ms(max)
        );
        println!(
            "digests          {:>9} answered in {answered_in:>7.2} s = {:>8.0} digests/s",
            args.digests,
            args.digests as f64 / answered_in
        );
        Ok(())
    }

    /// What the producer saw, the service's RSS and its bytes per stored alarm.
    fn footprint(&self) {
        let stats = self.producer.stats();
        println!(
            "producer         {:>9} messages acknowledged by the broker, {} publishes retried",
            stats.acked(),
            stats.retries()
        );
        let rss = self
            .service_pid
            .and_then(|pid| super::rss_bytes(pid).map(|rss| (pid, rss)));
        match rss {
            Some((pid, rss)) => println!(
                "service RSS      {:>9.1} MiB (pid {pid})",
                rss as f64 / 1048576.0
            ),
            None => {
                println!("service RSS      not local (or several instances): pass --service-pid")
            }
        }
        let data_dir = self
            .args
            .data_dir
            .clone()
            .unwrap_or(self.config.storage.path.clone());
        let bytes = super::dir_bytes(&data_dir);
        let alarms = self.workload.stored_alarms();
        if bytes > 0 && alarms > 0 {
            println!(
                "data dir         {:>9} bytes / {alarms} stored alarms = {:.0} B per alarm ({})",
                bytes,
                bytes as f64 / alarms as f64,
                data_dir.display()
            );
        }
    }
}

/// Prints one comparison run and returns its events per second.
fn report_rate(label: &str, events: u64, elapsed: Duration, what: &str) -> f64 {
    let per_second = events as f64 / elapsed.as_secs_f64();
    println!(
        "{label} {events:>9} evts in {:>7.2} s = {per_second:>8.0} events/s  {what}",
        elapsed.as_secs_f64()
    );
    per_second
}

/// CPU time spent per event by the broker, the service and this process during one phase:
/// a steadier figure than a rate on a shared machine, and the one that says where an event's
/// cost goes (README, Performance).
struct CpuMeter {
    /// Each name with the processes its figure sums.
    processes: Vec<(&'static str, Vec<u32>)>,
}

impl CpuMeter {
    fn new(brokers: &[u32], service: Option<u32>) -> CpuMeter {
        let mut processes = vec![("bench", vec![std::process::id()])];
        if !brokers.is_empty() {
            processes.push(("broker", brokers.to_vec()));
        }
        processes.extend(service.map(|pid| ("service", vec![pid])));
        CpuMeter { processes }
    }

    /// CPU used so far by each name's processes; `None` when one of them cannot be read.
    fn start(&self) -> Vec<Option<Duration>> {
        self.processes
            .iter()
            .map(|(_, pids)| pids.iter().map(|pid| super::cpu_time(*pid)).sum())
            .collect()
    }

    /// Prints the phase's CPU per event by process and returns the total, in µs.
    fn report(&self, started: &[Option<Duration>], events: u64, bench_is: &str) -> f64 {
        let mut parts = Vec::new();
        let mut total = 0.0;
        for ((name, _), (before, after)) in
            self.processes.iter().zip(started.iter().zip(self.start()))
        {
            if let (Some(before), Some(after)) = (before, after) {
                let micros = after.saturating_sub(*before).as_secs_f64() * 1e6 / events as f64;
                parts.push(format!("{name} {micros:.1}"));
                total += micros;
            }
        }
        println!("  cpu µs per event: {}  ({bench_is})", parts.join(", "));
        total
    }
}
