//! The process metrics every Prometheus client library exports on Linux
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`, ...),
//! read from `/proc` when scraped. prometheus-client has no process collector of its own.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The unit of the times in `/proc/<pid>/stat`: USER_HZ, which the kernel fixes at 100 for
/// user space on every architecture it runs this service on (x86, arm).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug)]
pub struct ProcessCollector;

/// What one scrape read; a field is `None` where `/proc` did not say.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    threads: Option<i64>,
    start_time_seconds: Option<f64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
}

impl Reading {
    fn now() -> Reading {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let mut reading = Reading::default();
        if let Some(stat) = read("/proc/self/stat") {
            let boot_time = read("/proc/stat").and_then(|text| boot_time(&text));
            reading.apply_stat(&stat, boot_time);
        }
        if let Some(status) = read("/proc/self/status") {
            reading.apply_status(&status);
        }
        reading.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|entries| i64::try_from(entries.count()).unwrap_or(i64::MAX));
        reading.max_fds = read("/proc/self/limits").and_then(|text| max_open_files(&text));
        reading
    }

    /// `/proc/self/stat`: fields after the command name (which may hold spaces, hence the
    /// last `)`): utime and stime are fields 14 and 15, starttime 22 (1-based, man 5 proc).
    fn apply_stat(&mut self, stat: &str, boot_time: Option<f64>) {
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state).
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        if let (Some(user), Some(system)) = (field(14), field(15)) {
            self.cpu_seconds = Some((user + system) / TICKS_PER_SECOND);
        }
        if let (Some(start), Some(boot)) = (field(22), boot_time) {
            self.start_time_seconds = Some(boot + start / TICKS_PER_SECOND);
        }
    }

    fn apply_status(&mut self, status: &str) {
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let number = value
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<i64>().ok());
            match key {
                "VmRSS" => self.resident_bytes = number.map(|kb| kb * 1024),
                "VmSize" => self.virtual_bytes = number.map(|kb| kb * 1024),
                "Threads" => self.threads = number,
                _ => {}
            }
        }
    }
}

fn boot_time(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

fn max_open_files(limits: &str) -> Option<i64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let reading = Reading::now();
        if let Some(seconds) = reading.cpu_seconds {
            let counter = ConstCounter::new(seconds);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                reading.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                reading.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                reading.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                reading.max_fds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                reading.threads,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let gauge = ConstGauge::new(value);
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
        if let Some(start) = reading.start_time_seconds {
            let gauge = ConstGauge::new(start);
            let metric = encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_start_time_memory_and_limits_from_proc_text() {
        let mut reading = Reading::default();
        // A command name with spaces and a parenthesis, as the kernel allows.
        let stat = "4242 (alarm (digest) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    250 50 0 0 20 0 7 0 123400 1000000 2000 18446744073709551615";
        reading.apply_stat(stat, Some(1_700_000_000.0));
        assert_eq!(reading.cpu_seconds, Some(3.0));
        assert_eq!(reading.start_time_seconds, Some(1_700_001_234.0));
        reading.apply_status(
            "Name:\talarm-digest\nVmSize:\t  2048 kB\nVmRSS:\t   1024 kB\nThreads:\t7\n",
        );
        assert_eq!(reading.resident_bytes, Some(1024 * 1024));
        assert_eq!(reading.virtual_bytes, Some(2048 * 1024));
        assert_eq!(reading.threads, Some(7));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000.0)
        );
    }

    #[test]
    fn this_process_can_be_read() {
        let reading = Reading::now();
        assert!(reading.resident_bytes.is_some_and(|rss| rss > 0));
        assert!(reading.open_fds.is_some_and(|fds| fds > 0));
        assert!(reading.cpu_seconds.is_some());
    }
}
