//! Metrics: each worker's registry, and the supervisor's cluster-wide sum of them.
//!
//! # How workers report
//!
//! A worker keeps an ordinary [`prometheus_client`] [`Registry`]. When the supervisor is
//! scraped it asks every worker for a snapshot and waits up to 250 ms for the answers; workers
//! also report every `--metrics-interval` and once more when they finish draining. A snapshot
//! is the registry encoded in the OpenMetrics text format, sent over the control socket.
//! The supervisor parses each snapshot into `(family, kind, labels) -> value` samples and its
//! [`ClusterCollector`] sums them by family and label set at scrape time. When a worker exits
//! its last counter and histogram values are folded into a "retired" total, so cluster
//! counters never go backwards across restarts; its gauges are dropped (a dead worker holds
//! no connections).
//!
//! Adding a metric to the cluster is therefore one `registry.register(..)` call on
//! [`WorkerMetrics::registry`]: counters, gauges and histograms are summed without any
//! supervisor change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tower_abort::AbortRoot;
use tower_backpressure::{BackpressureHandle, ShedReason};
use tower_singleflight::{BypassReason, Stats as SingleflightStats};
use tower_zerocopy::SendfileStats;

/// Label set of `http_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatusLabel {
    pub(crate) status: u16,
}

/// The metrics one worker (or the single process of `--workers 0`) records.
#[derive(Debug)]
pub(crate) struct WorkerMetrics {
    /// Everything registered here is reported to the supervisor and summed over workers.
    pub(crate) registry: Registry,
    /// `http_requests_total{status}`: responses sent, by status code.
    pub(crate) requests: Family<StatusLabel, Counter>,
    /// `http_connections_open`: connections currently open.
    pub(crate) connections_open: Gauge,
    /// `http_connections_refused_total`: connections closed at once because the worker
    /// already had `--max-connections` open.
    pub(crate) connections_refused: Counter,
    /// Counters of statuses 100..=599, filled on first use.
    status_cache: Box<[OnceLock<Counter>]>,
    /// `demo_work_cancelled_total`: `/sleep` requests that stopped early because their
    /// `AbortSignal` fired (client gone, deadline, shutdown).
    pub(crate) work_cancelled: Counter,
    /// `demo_backend_calls_total`: calls that reached the expensive backend of
    /// `/expensive/{key}` (behind tower-singleflight, so fewer than the requests).
    pub(crate) backend_calls: Counter,
    /// The parent of every request's `AbortSignal` in this process; the drain shuts it
    /// down, and its per-reason counts are exported as `abort_total{reason}`.
    pub(crate) abort_root: AbortRoot,
    /// Bytes the connections sent with `sendfile(2)` and from user-space buffers, exported as
    /// `zerocopy_sendfile_bytes_total` and `zerocopy_copied_bytes_total`.
    pub(crate) sendfile: SendfileStats,
}

impl WorkerMetrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<StatusLabel, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP responses sent, by status code (including hyper's automatic 400/431)",
            requests.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "http_connections_open",
            "HTTP connections currently open",
            connections_open.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "HTTP connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        let work_cancelled = Counter::default();
        registry.register(
            "demo_work_cancelled",
            "/sleep requests stopped early because their AbortSignal fired",
            work_cancelled.clone(),
        );
        let backend_calls = Counter::default();
        registry.register(
            "demo_backend_calls",
            "Calls that reached the expensive backend of /expensive/{key} (after coalescing)",
            backend_calls.clone(),
        );
        let abort_root = AbortRoot::new();
        registry.register_collector(Box::new(AbortCollector(abort_root.clone())));
        let sendfile = SendfileStats::new();
        registry.register_collector(Box::new(ZeroCopyCollector(sendfile.clone())));
        WorkerMetrics {
            registry,
            requests,
            connections_open,
            connections_refused,
            status_cache: (100..600).map(|_| OnceLock::new()).collect(),
            work_cancelled,
            backend_calls,
            abort_root,
            sendfile,
        }
    }

    /// Reports a backpressure layer's live state with every snapshot:
    /// `backpressure_in_flight`, `backpressure_queued`, `backpressure_limit` (gauges, summed
    /// over workers into the cluster's totals) and `backpressure_shed_total{reason}`.
    pub(crate) fn register_backpressure(&mut self, handle: BackpressureHandle) {
        self.registry
            .register_collector(Box::new(BackpressureCollector { handle }));
    }

    /// Reports tower-singleflight's counters with every snapshot:
    /// `singleflight_leaders_total`, `singleflight_followers_total`,
    /// `singleflight_fallbacks_total`, `singleflight_bypass_total{reason}` and the
    /// `singleflight_in_flight` gauge (summed over workers).
    pub(crate) fn register_singleflight(&mut self, stats: SingleflightStats) {
        self.registry
            .register_collector(Box::new(SingleflightCollector { stats }));
    }

    /// Counts one response.
    pub(crate) fn count_response(&self, status: u16) {
        // The family's lookup takes a read lock and hashes per call; valid statuses keep
        // their counter in a lock-free cache after the first response.
        let Some(slot) = status
            .checked_sub(100)
            .and_then(|i| self.status_cache.get(usize::from(i)))
        else {
            self.requests.get_or_create(&StatusLabel { status }).inc();
            return;
        };
        slot.get_or_init(|| self.requests.get_or_create(&StatusLabel { status }).clone())
            .inc();
    }

    /// The registry in OpenMetrics text, as sent to the supervisor.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Encodes `abort_total{reason}` from the root's counters at encode time.
#[derive(Debug)]
struct AbortCollector(AbortRoot);

impl prometheus_client::collector::Collector for AbortCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        let mut family = encoder.encode_descriptor(
            "abort",
            "Requests whose AbortSignal fired, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in stats.iter() {
            let labels = [("reason", reason.as_str())];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Reads a [`BackpressureHandle`] at encode time.
#[derive(Debug)]
struct BackpressureCollector {
    handle: BackpressureHandle,
}

impl prometheus_client::collector::Collector for BackpressureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let gauges = [
            (
                "backpressure_in_flight",
                "Requests inside the application now (holding a backpressure permit)",
                self.handle.in_flight(),
            ),
            (
                "backpressure_queued",
                "Requests waiting for a backpressure permit now",
                self.handle.queued(),
            ),
            (
                "backpressure_limit",
                "Concurrency limit in force (per worker; summed over workers)",
                self.handle.limit(),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value as i64);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        let mut family = encoder.encode_descriptor(
            "backpressure_shed",
            "Requests shed by backpressure (answered 503, or 413 for too large), by reason",
            None,
            MetricType::Counter,
        )?;
        for reason in ShedReason::ALL {
            let labels = vec![("reason".to_owned(), reason.as_str().to_owned())];
            let counter = ConstCounter::new(self.handle.shed_count(reason));
            counter.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Reads a singleflight [`SingleflightStats`] handle at encode time.
#[derive(Debug)]
struct SingleflightCollector {
    stats: SingleflightStats,
}

impl prometheus_client::collector::Collector for SingleflightCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let counters = [
            (
                "singleflight_leaders",
                "Requests that called the backend on behalf of a flight",
                self.stats.leaders(),
            ),
            (
                "singleflight_followers",
                "Requests that joined a flight instead of calling the backend",
                self.stats.followers(),
            ),
            (
                "singleflight_fallbacks",
                "Followers that made their own call (unshareable response, Vary, timeout, retry)",
                self.stats.fallbacks(),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let gauge = ConstGauge::new(self.stats.in_flight() as i64);
        let metric = encoder.encode_descriptor(
            "singleflight_in_flight",
            "Keys with a flight in progress now",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)?;
        let mut family = encoder.encode_descriptor(
            "singleflight_bypass",
            "Requests that did not get a shared response, by reason",
            None,
            MetricType::Counter,
        )?;
        for reason in BypassReason::ALL {
            let labels = vec![("reason".to_owned(), reason.as_str().to_owned())];
            let counter = ConstCounter::new(self.stats.bypassed(reason));
            counter.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Encodes the `SendfileStats` counters at encode time.
#[derive(Debug)]
struct ZeroCopyCollector(SendfileStats);

impl prometheus_client::collector::Collector for ZeroCopyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (name, help, value) in [
            (
                "zerocopy_sendfile_bytes",
                "Response bytes sent with sendfile(2), never copied through user space",
                self.0.sendfile_bytes(),
            ),
            (
                "zerocopy_copied_bytes",
                "Response bytes written from user-space buffers (heads, small or non-file bodies, HTTP/2)",
                self.0.copied_bytes(),
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(metric)?;
        }
        Ok(())
    }
}

// ===== snapshot parsing =====

/// Kind of a metric family, as in the `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Label pairs in the order the worker encoded them (prometheus-client's order is stable).
type Labels = Vec<(String, String)>;

#[derive(Debug, Clone, Default, PartialEq)]
struct HistogramValue {
    sum: f64,
    count: f64,
    /// `(le, cumulative count)`, in the order the worker sent them.
    buckets: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Scalar(f64),
    Histogram(HistogramValue),
}

#[derive(Debug, Clone, PartialEq)]
struct FamilySnapshot {
    kind: Kind,
    help: String,
    series: BTreeMap<Labels, Value>,
}

/// One worker's metrics, parsed from its OpenMetrics text.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Snapshot {
    families: BTreeMap<String, FamilySnapshot>,
}

impl Snapshot {
    /// Parses prometheus-client's OpenMetrics text. Families of other kinds (info, state
    /// sets, ...) and malformed lines are skipped: a worker must not be able to break the
    /// supervisor's scrape.
    pub(crate) fn parse(text: &str) -> Snapshot {
        let mut families: BTreeMap<String, FamilySnapshot> = BTreeMap::new();
        let mut helps: BTreeMap<&str, String> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                if let Some((name, help)) = rest.split_once(' ') {
                    helps.insert(name, unescape_help(help));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let Some((name, kind)) = rest.split_once(' ') else {
                    continue;
                };
                let kind = match kind {
                    "counter" => Kind::Counter,
                    "gauge" => Kind::Gauge,
                    "histogram" => Kind::Histogram,
                    _ => continue,
                };
                families.insert(
                    name.to_owned(),
                    FamilySnapshot {
                        kind,
                        help: helps.get(name).cloned().unwrap_or_default(),
                        series: BTreeMap::new(),
                    },
                );
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((metric, mut labels, value)) = parse_sample(line) else {
                continue;
            };
            // The sample belongs to the longest family name it starts with.
            let Some((family_name, family)) = families
                .range_mut(..=metric.to_owned())
                .rev()
                .find(|(name, _)| metric.starts_with(name.as_str()))
            else {
                continue;
            };
            let suffix = &metric[family_name.len()..];
            match (family.kind, suffix) {
                (Kind::Counter, "_total") | (Kind::Gauge, "") => {
                    family.series.insert(labels, Value::Scalar(value));
                }
                (Kind::Histogram, "_sum" | "_count" | "_bucket") => {
                    let le = if suffix == "_bucket" {
                        let Some(pos) = labels.iter().position(|(k, _)| k == "le") else {
                            continue;
                        };
                        let (_, le) = labels.remove(pos);
                        match le.as_str() {
                            "+Inf" => Some(f64::INFINITY),
                            v => match v.parse::<f64>() {
                                Ok(v) => Some(v),
                                Err(_) => continue,
                            },
                        }
                    } else {
                        None
                    };
                    let entry = family
                        .series
                        .entry(labels)
                        .or_insert_with(|| Value::Histogram(HistogramValue::default()));
                    let Value::Histogram(h) = entry else { continue };
                    match (suffix, le) {
                        ("_sum", _) => h.sum = value,
                        ("_count", _) => h.count = value,
                        (_, Some(le)) => h.buckets.push((le, value)),
                        _ => {}
                    }
                }
                // `_created` timestamps and unknown suffixes are not summable.
                _ => {}
            }
        }
        Snapshot { families }
    }

    /// Adds `other` into `self`; with `counters_only`, gauges of `other` are ignored.
    fn add(&mut self, other: &Snapshot, counters_only: bool) {
        for (name, fam) in &other.families {
            if counters_only && fam.kind == Kind::Gauge {
                continue;
            }
            let mine = self
                .families
                .entry(name.clone())
                .or_insert_with(|| FamilySnapshot {
                    kind: fam.kind,
                    help: fam.help.clone(),
                    series: BTreeMap::new(),
                });
            if mine.kind != fam.kind {
                // Two workers disagree (a rolling restart to a binary that changed a
                // metric's type): keep the first kind rather than emit nonsense.
                continue;
            }
            for (labels, value) in &fam.series {
                match (mine.series.get_mut(labels), value) {
                    (None, v) => {
                        mine.series.insert(labels.clone(), v.clone());
                    }
                    (Some(Value::Scalar(a)), Value::Scalar(b)) => *a += b,
                    (Some(Value::Histogram(a)), Value::Histogram(b)) => {
                        a.sum += b.sum;
                        a.count += b.count;
                        if a.buckets.len() == b.buckets.len()
                            && a.buckets.iter().zip(&b.buckets).all(|(x, y)| x.0 == y.0)
                        {
                            for (x, y) in a.buckets.iter_mut().zip(&b.buckets) {
                                x.1 += y.1;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Splits `name{a="x",b="y"} 12` into its parts; `None` for anything malformed.
fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            body = body.trim_start_matches(',');
            if let Some(after) = body.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after_key) = body.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after_key.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i + 1,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            };
            labels.push((key.to_owned(), value));
            body = &after_key[end..];
        }
    }
    let mut fields = rest.split_whitespace();
    let value = match fields.next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

fn unescape_help(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    let mut chars = help.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ===== supervisor side =====

/// The supervisor's view of every worker's last snapshot.
#[derive(Debug, Default)]
pub(crate) struct Aggregator {
    live: BTreeMap<u64, Snapshot>,
    retired: Snapshot,
}

impl Aggregator {
    /// Records the latest snapshot of worker `id`.
    pub(crate) fn update(&mut self, id: u64, snapshot: Snapshot) {
        self.live.insert(id, snapshot);
    }

    /// Worker `id` exited: keep its counters and histograms, forget its gauges.
    pub(crate) fn retire(&mut self, id: u64) {
        if let Some(last) = self.live.remove(&id) {
            self.retired.add(&last, true);
        }
    }

    /// Cluster-wide totals.
    fn total(&self) -> Snapshot {
        let mut total = self.retired.clone();
        for snap in self.live.values() {
            total.add(snap, false);
        }
        total
    }
}

/// Encodes the [`Aggregator`]'s cluster-wide totals at scrape time.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClusterCollector {
    pub(crate) aggregator: Arc<Mutex<Aggregator>>,
}

impl prometheus_client::collector::Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let total = self
            .aggregator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .total();
        for (name, fam) in &total.families {
            let metric_type = match fam.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut metric_encoder =
                encoder.encode_descriptor(name, &fam.help, None, metric_type)?;
            for (labels, value) in &fam.series {
                let family_encoder = metric_encoder.encode_family(labels)?;
                SummedValue {
                    kind: fam.kind,
                    value,
                }
                .encode(family_encoder)?;
            }
        }
        Ok(())
    }
}

/// One summed series, encoded as its family's kind.
#[derive(Debug)]
struct SummedValue<'a> {
    kind: Kind,
    value: &'a Value,
}

/// Integral values are encoded as integers so `http_requests_total` reads `12`, not `12.0`.
fn as_u64(v: f64) -> Option<u64> {
    (v >= 0.0 && v.fract() == 0.0 && v < 9.0e15).then_some(v as u64)
}

impl EncodeMetric for SummedValue<'_> {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        type NoExemplar = prometheus_client::encoding::NoLabelSet;
        match (self.kind, self.value) {
            (Kind::Counter, Value::Scalar(v)) => match as_u64(*v) {
                Some(n) => encoder.encode_counter::<NoExemplar, u64, f64>(&n, None),
                None => encoder.encode_counter::<NoExemplar, f64, f64>(v, None),
            },
            (Kind::Gauge, Value::Scalar(v)) => {
                if v.fract() == 0.0 && v.abs() < 9.0e15 {
                    encoder.encode_gauge(&(*v as i64))
                } else {
                    encoder.encode_gauge(v)
                }
            }
            (Kind::Histogram, Value::Histogram(h)) => {
                // prometheus-client expects per-bucket counts and accumulates them itself.
                let mut prev = 0.0;
                let buckets: Vec<(f64, u64)> = h
                    .buckets
                    .iter()
                    .map(|&(le, cumulative)| {
                        let n = (cumulative - prev).max(0.0);
                        prev = cumulative;
                        (le, n as u64)
                    })
                    .collect();
                encoder.encode_histogram::<NoExemplar>(h.sum, h.count as u64, &buckets, None)
            }
            _ => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        match self.kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::Histogram => MetricType::Histogram,
        }
    }
}

/// The supervisor's own metrics plus the summed worker metrics.
#[derive(Debug)]
pub(crate) struct ClusterMetrics {
    pub(crate) registry: Registry,
    /// `cluster_workers`: slots with a running, ready worker.
    pub(crate) workers: Gauge,
    /// `cluster_worker_restarts_total`: workers replaced after an unplanned exit.
    pub(crate) restarts: Counter,
    /// `cluster_rolling_restarts_total`: completed SIGHUP rolling restarts.
    pub(crate) rolling_restarts: Counter,
    pub(crate) collector: ClusterCollector,
}

impl ClusterMetrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let workers = Gauge::default();
        registry.register(
            "cluster_workers",
            "Worker processes running and ready to serve",
            workers.clone(),
        );
        let restarts = Counter::default();
        registry.register(
            "cluster_worker_restarts",
            "Workers restarted after an unplanned exit (crash, kill)",
            restarts.clone(),
        );
        let rolling_restarts = Counter::default();
        registry.register(
            "cluster_rolling_restarts",
            "Completed rolling restarts (SIGHUP)",
            rolling_restarts.clone(),
        );
        let collector = ClusterCollector::default();
        registry.register_collector(Box::new(collector.clone()));
        ClusterMetrics {
            registry,
            workers,
            restarts,
            rolling_restarts,
            collector,
        }
    }
}

/// Encodes a registry for `GET /metrics`.
pub(crate) fn encode_registry(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::histogram::Histogram;

    #[test]
    fn singleflight_and_backend_metrics_are_exported() {
        let mut m = WorkerMetrics::new();
        m.register_singleflight(crate::routes::singleflight().stats());
        m.backend_calls.inc();
        let text = m.encode();
        for line in [
            "demo_backend_calls_total 1",
            "singleflight_leaders_total 0",
            "singleflight_followers_total 0",
            "singleflight_fallbacks_total 0",
            "singleflight_in_flight 0",
            "singleflight_bypass_total{reason=\"method\"} 0",
            "singleflight_bypass_total{reason=\"set_cookie\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    fn worker(requests_200: u64, open: i64) -> WorkerMetrics {
        let m = WorkerMetrics::new();
        for _ in 0..requests_200 {
            m.count_response(200);
        }
        m.count_response(404);
        m.connections_open.set(open);
        m
    }

    fn cluster_text(agg: Aggregator) -> String {
        let cluster = ClusterMetrics::new();
        *cluster.collector.aggregator.lock().unwrap() = agg;
        encode_registry(&cluster.registry)
    }

    #[test]
    fn sums_counters_and_gauges_over_workers() {
        let mut agg = Aggregator::default();
        agg.update(1, Snapshot::parse(&worker(3, 2).encode()));
        agg.update(2, Snapshot::parse(&worker(4, 5).encode()));
        let text = cluster_text(agg);
        assert!(
            text.contains("http_requests_total{status=\"200\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("http_requests_total{status=\"404\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("http_connections_open 7\n"), "{text}");
        assert!(text.contains("# TYPE http_requests counter\n"), "{text}");
    }

    #[test]
    fn counters_of_dead_workers_are_kept_gauges_are_not() {
        let mut agg = Aggregator::default();
        agg.update(1, Snapshot::parse(&worker(10, 3).encode()));
        agg.update(2, Snapshot::parse(&worker(1, 1).encode()));
        agg.retire(1);
        // its replacement starts from zero
        agg.update(3, Snapshot::parse(&worker(0, 0).encode()));
        let text = cluster_text(agg);
        assert!(
            text.contains("http_requests_total{status=\"200\"} 11\n"),
            "{text}"
        );
        assert!(
            text.contains("http_requests_total{status=\"404\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("http_connections_open 1\n"), "{text}");
    }

    #[test]
    fn a_metric_registered_in_a_worker_is_summed_without_supervisor_changes() {
        let snaps: Vec<Snapshot> = (0..2)
            .map(|i| {
                let mut m = WorkerMetrics::new();
                #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
                struct Reason {
                    reason: String,
                }
                let fam = Family::<Reason, Counter>::default();
                m.registry
                    .register("example", "examples \"quoted\"", fam.clone());
                fam.get_or_create(&Reason {
                    reason: "client \"gone\"\\".into(),
                })
                .inc_by(i + 1);
                let h = Histogram::new([0.1, 1.0]);
                m.registry.register("wait_seconds", "wait", h.clone());
                h.observe(0.05);
                h.observe(i as f64 + 0.5);
                Snapshot::parse(&m.encode())
            })
            .collect();
        let mut agg = Aggregator::default();
        agg.update(1, snaps[0].clone());
        agg.update(2, snaps[1].clone());
        let text = cluster_text(agg);
        assert!(
            text.contains("example_total{reason=\"client \\\"gone\\\"\\\\\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("wait_seconds_count 4\n"), "{text}");
        assert!(
            text.contains("wait_seconds_bucket{le=\"0.1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("wait_seconds_bucket{le=\"1.0\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("wait_seconds_bucket{le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("wait_seconds_sum 2.1"), "{text}");
    }

    #[test]
    fn garbage_is_ignored() {
        let snap = Snapshot::parse(
            "# TYPE x counter\nx_total{a=\"1\" 5\nx_total{a=\"1\"} nan-ish\n# TYPE y info\ny_info 1\n\u{0}\n",
        );
        assert!(snap.families["x"].series.is_empty());
        assert!(!snap.families.contains_key("y"));
    }
}
