//! `alarm-digest bench`: end-to-end load against a running deployment (see README,
//! Performance). It talks to the broker only; RSS and disk are read when the service is local.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::bus::{self, Topology};
use crate::config::Config;
use crate::load::producer::{Producer, ProducerOptions, ProducerStats};
use crate::load::{self, ceiling, naive, Workload};

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

pub async fn run(config: Config, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let Some(client) = bus::connect(&config.nats, &CancellationToken::new()).await? else {
        return Ok(ExitCode::from(130));
    };
    let js = async_nats::jetstream::new(client.clone());
    Topology::new(config.streams.clone(), config.shards.count)
        .ensure_streams(&js)
        .await?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let give_up = Duration::from_secs(args.give_up_secs.max(1));
    let options = ProducerOptions {
        window: args.window.max(1),
        give_up_after: give_up,
        ..ProducerOptions::default()
    };
    let stats = std::sync::Arc::new(ProducerStats::default());
    let producer = Producer::new(&client, options, stats.clone());
    // The first producer shares the control connection; every other one has its own.
    let mut producers = vec![producer.clone()];
    for _ in 1..args.producers.max(1) {
        let Some(own) = bus::connect(&config.nats, &CancellationToken::new()).await? else {
            return Ok(ExitCode::from(130));
        };
        producers.push(Producer::new(&own, options, stats.clone()));
    }
    let workload = Workload {
        events: args.events,
        users: args.users.max(1),
        alarms: args.alarms.max(1),
    };
    println!(
        "alarm-digest bench  {}  events={} users={} alarms={} rate={} shards={} input_partitions={} producers={}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        workload.events,
        workload.users,
        workload.alarms,
        if args.rate == 0 {
            "max".to_string()
        } else {
            args.rate.to_string()
        },
        config.shards.count,
        config.streams.input_partitions,
        producers.len(),
    );

    let service_pid = args.service_pid.or_else(load::find_service_pid);
    let meter = CpuMeter::new(&args.broker_pid, service_pid);

    let ceiling = if args.broker_ceiling && workload.events > 0 {
        let cpu = meter.start();
        let elapsed = ceiling::measure(
            &producers,
            &config,
            &workload,
            args.rate,
            (timeout, give_up),
        )
        .await?;
        let rate = report_rate(
            "broker ceiling  ",
            workload.events,
            elapsed,
            "(input stream → router hop in envelopes → shard streams → ack, no processing)",
        );
        let cpu = meter.report(
            &cpu,
            workload.events,
            "the bench process: producer, zero-work router and consumers",
        );
        Some((rate, cpu))
    } else {
        None
    };

    let naive = if args.naive && workload.events > 0 {
        let cpu = meter.start();
        let elapsed =
            naive::measure(&producer, &config, &workload, args.rate, (timeout, give_up)).await?;
        Some(report_rate(
            "naive single hop",
            workload.events,
            elapsed,
            "(one consumer: decode, write, flush, ack each event)",
        ))
        .inspect(|_| {
            meter.report(
                &cpu,
                workload.events,
                "the bench process: producer, naive consumer",
            );
        })
    } else {
        None
    };

    if workload.events > 0 {
        let inputs = load::input_streams(&config);
        let first = load::inputs_stored(&js, &inputs).await?;
        let cpu = meter.start();
        let started = Instant::now();
        // Producers publish the plain subject, as producers do: the server's mapping spreads
        // it over the partitions.
        let subject = |_| config.streams.status_subject.clone();
        let progress = load::report_progress(&producer, workload.events);
        let published = load::publish_spread(
            &producers,
            producers.len(),
            subject,
            &workload,
            0..workload.events,
            args.rate,
        )
        .await;
        progress.abort();
        published?;
        let consumers = load::service_consumers(&config);
        load::wait_drained(
            &js,
            (&inputs, first + workload.events),
            &consumers,
            (timeout, give_up),
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
        let cpu = meter.report(&cpu, workload.events, "the bench process: producer");
        if let Some((_, ceiling_cpu)) = ceiling.filter(|_| cpu > 0.0) {
            println!(
                "  cpu per event: the ceiling's is {:.2} of this (the rate ratio when the machine is CPU-bound)",
                ceiling_cpu / cpu
            );
        }
    }

    if args.digests > 0 {
        let background = (args.background_rate > 0).then(|| {
            let seconds = args.digests / args.digest_rate.max(1) + 3;
            let range = workload.events..workload.events + args.background_rate * seconds;
            let producer = producer.clone();
            let subject = config.streams.status_subject.clone();
            let rate = args.background_rate;
            tokio::spawn(async move {
                load::publish_events(&producer, &subject, &workload, range, rate).await
            })
        });
        let digests_started = Instant::now();
        let latencies = load::digest_latencies(
            &client,
            &producer,
            &config,
            &workload,
            (args.digests, args.digest_rate),
            give_up,
        )
        .await?;
        if let Some(background) = background {
            background.abort();
        }
        let [p50, p90, p99, max] = load::percentiles(latencies);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let during = if args.background_rate > 0 {
            format!("  (ingest running at {}/s)", args.background_rate)
        } else {
            "  (ingest idle)".to_string()
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
    }

    println!(
        "producer         {:>9} messages acknowledged by the broker, {} publishes retried",
        producer.stats().acked(),
        producer.stats().retries()
    );
    match service_pid.and_then(|pid| load::rss_bytes(pid).map(|rss| (pid, rss))) {
        Some((pid, rss)) => println!(
            "service RSS      {:>9.1} MiB (pid {pid})",
            rss as f64 / 1048576.0
        ),
        None => println!("service RSS      not local (or several instances): pass --service-pid"),
    }
    let data_dir = args.data_dir.clone().unwrap_or(config.storage.path.clone());
    let bytes = load::dir_bytes(&data_dir);
    if bytes > 0 && workload.stored_alarms() > 0 {
        println!(
            "data dir         {:>9} bytes / {} stored alarms = {:.0} B per alarm ({})",
            bytes,
            workload.stored_alarms(),
            bytes as f64 / workload.stored_alarms() as f64,
            data_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
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
            .map(|(_, pids)| pids.iter().map(|pid| load::cpu_time(*pid)).sum())
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
