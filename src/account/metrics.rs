//! Prometheus metrics (prometheus-client, OpenMetrics text): what the daemon counts and
//! how a scrape is rendered. Per-account gauges (token expiry, last success, status) are
//! read from the published [`TokenState`](crate::account::TokenState) at scrape time, so
//! the account task records only what a state cannot tell: each refresh attempt, its
//! result and its duration.
//!
//! The counters live in a [`Metrics`] that whoever runs the daemon creates and hands
//! around as an `Arc<Metrics>`, like the clock: the socket server gets it as an argument
//! (`Listeners::spawn`, `serve`), counts its requests in it and renders it with
//! [`Metrics::encode`] for the accounts the caller may see; the refresh engine records
//! its attempts in the same handle (`Shared::metrics`). Tests hand in their own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::schedule::{self, ErrorClass};
use super::{AccountView, Status};
use crate::oauth::{Error, Token};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Refresh durations, in seconds: token endpoints answer in tens of milliseconds to
/// tens of seconds (the default request timeout is 30 s).
const DURATION_BUCKETS: [f64; 11] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// How a refresh attempt ended, as the `result` label says it.
const RESULTS: [&str; 4] = ["success", "failure", "rate_limited", "rejected"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `unix` (the socket) or `tcp` (`metrics_listen`).
    listener: &'static str,
    code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

/// What one account's task recorded, as plain atomics: 72 bytes, where
/// prometheus-client's `Histogram` and `Counter`s took about 600 in six allocations
/// (issue #11: one per account, thousands of accounts). Counts are 32-bit: an account
/// asks at most every `min_refresh_interval`, so four billion requests take centuries.
#[derive(Debug, Default)]
struct AccountMetrics {
    /// Indexed like [`RESULTS`].
    attempts: [AtomicU32; 4],
    /// Durations per bucket of [`DURATION_BUCKETS`], then above the last: each in the
    /// first bucket it fits (the encoding makes them cumulative).
    buckets: [AtomicU32; DURATION_BUCKETS.len() + 1],
    /// The sum of the durations in seconds, as `f64` bits.
    sum: AtomicU64,
    /// Tokens that expired without a renewal.
    expirations: AtomicU32,
    /// Cluster mode: refreshes put off for another member's request in flight.
    link_waits: AtomicU32,
}

impl AccountMetrics {
    /// Whether anything was counted: the counters of an account that has recorded
    /// nothing yet are not shown (made early by [`Metrics::prepare`], they exist).
    fn recorded(&self) -> bool {
        let nonzero = |c: &AtomicU32| c.load(Ordering::Relaxed) != 0;
        self.attempts.iter().any(nonzero) || nonzero(&self.expirations) || nonzero(&self.link_waits)
    }

    fn observe(&self, seconds: f64) {
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + seconds).to_bits())
            });
    }

    /// Encodes the duration histogram.
    fn encode_duration(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| u64::from(b.load(Ordering::Relaxed)))
            .collect();
        let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }
}

/// Every counter of the daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    accounts: Mutex<HashMap<String, Arc<AccountMetrics>>>,
    reloads: Family<ReloadLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
}

impl Metrics {
    /// No counts yet.
    pub fn new() -> Self {
        Metrics::default()
    }

    /// Records one token request of `account`: its result and how long it took.
    pub fn refresh_attempt(&self, account: &str, result: &Result<Token, Error>, took: Duration) {
        let index = match result {
            Ok(_) => 0,
            Err(e) => match schedule::classify(e) {
                ErrorClass::Transient | ErrorClass::Local => 1,
                ErrorClass::RateLimited(_) => 2,
                ErrorClass::Rejected => 3,
            },
        };
        let m = self.account(account);
        m.attempts[index].fetch_add(1, Ordering::Relaxed);
        m.observe(took.as_secs_f64());
    }

    /// Records a token of `account` that expired before a new one came (its outputs
    /// then follow `on_expiry`).
    pub fn token_expired(&self, account: &str) {
        self.account(account)
            .expirations
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Cluster mode: records a refresh of `account` put off because another member is
    /// asking the provider with the chain's current link (its answer is waited for).
    pub fn cluster_link_wait(&self, account: &str) {
        self.account(account)
            .link_waits
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Records a configuration reload (SIGHUP or a change of the file).
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// Records an answered HTTP request.
    pub fn request(&self, listener: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels { listener, code })
            .inc();
    }

    /// Makes the counters of `names` now, together, before their accounts start (issue
    /// #11: made one by one in the first refreshes, among their requests' short-lived
    /// buffers, they and the map's regrowths left holes in the heap that stayed).
    pub fn prepare<'a>(&self, names: impl ExactSizeIterator<Item = &'a str>) {
        let mut map = self
            .accounts
            .lock()
            .expect("no code panics holding this lock");
        map.reserve(names.len());
        for name in names {
            if !map.contains_key(name) {
                map.insert(name.to_owned(), Arc::default());
            }
        }
    }

    fn account(&self, name: &str) -> Arc<AccountMetrics> {
        let mut map = self
            .accounts
            .lock()
            .expect("no code panics holding this lock");
        if let Some(m) = map.get(name) {
            return m.clone();
        }
        map.entry(name.to_owned()).or_default().clone()
    }

    /// The OpenMetrics text for `accounts` (those the caller may see) at `now`.
    pub fn encode<'a>(
        &self,
        accounts: impl IntoIterator<Item = &'a AccountView>,
        now: SystemTime,
    ) -> String {
        let rows = {
            let recorded = self
                .accounts
                .lock()
                .expect("no code panics holding this lock");
            accounts
                .into_iter()
                .map(|v| {
                    let counted = recorded.get(&v.account.name).filter(|m| m.recorded());
                    Row::new(v, counted.cloned(), now)
                })
                .collect()
        };
        let mut registry = Registry::with_prefix("tokend");
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            self.reloads.clone(),
        );
        registry.register(
            "http_requests",
            "Answered HTTP requests, by listener (unix: the socket, tcp: metrics_listen) and status code",
            self.requests.clone(),
        );
        registry.register_collector(Box::new(AccountsCollector { rows }));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// One account at scrape time.
#[derive(Debug)]
struct Row {
    name: String,
    status: Status,
    valid: bool,
    expires_at: Option<f64>,
    last_success: Option<f64>,
    recorded: Option<Arc<AccountMetrics>>,
    /// Cluster mode: 1 when this member leads the account, 0 when another does, none
    /// outside cluster mode; and whether this member is cut off.
    leading: Option<f64>,
    degraded: Option<f64>,
    /// Cluster mode: this member's clock against the provider's (or etcd's), seconds.
    skew: Option<f64>,
}

impl Row {
    fn new(view: &AccountView, recorded: Option<Arc<AccountMetrics>>, now: SystemTime) -> Row {
        let state = view.state.borrow();
        Row {
            name: view.account.name.clone(),
            status: state.status,
            valid: state.valid_token(now).is_some(),
            expires_at: state.token.as_ref().map(|t| unix_seconds(t.expires_at)),
            last_success: state.last_refresh.map(unix_seconds),
            recorded,
            leading: view.cluster.as_ref().map(|c| {
                f64::from(u8::from(
                    state.cluster().leader.as_deref() == Some(c.member()),
                ))
            }),
            degraded: view
                .cluster
                .as_ref()
                .map(|_| f64::from(u8::from(state.cluster().degraded))),
            skew: view.cluster.as_ref().and_then(|c| c.clock_skew_seconds()),
        }
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

const STATUSES: [Status; 5] = [
    Status::Pending,
    Status::Refreshing,
    Status::Fresh,
    Status::Failing,
    Status::Expired,
];

/// Encodes the per-account families from the rows of one scrape.
#[derive(Debug)]
struct AccountsCollector {
    rows: Vec<Row>,
}

impl AccountsCollector {
    fn gauge(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&Row) -> Option<f64>,
    ) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for row in &self.rows {
            if let Some(v) = value(row) {
                let labels = [("account", row.name.as_str())];
                ConstGauge::new(v).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    /// A per-account counter of the accounts that recorded something.
    fn counter(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&AccountMetrics) -> &AtomicU32,
    ) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for row in &self.rows {
            let Some(m) = &row.recorded else { continue };
            let labels = [("account", row.name.as_str())];
            ConstCounter::new(u64::from(value(m).load(Ordering::Relaxed)))
                .encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// The cluster-mode families: who leads, who is cut off, clock skew, link waits.
    fn encode_cluster(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.gauge(
            encoder,
            "cluster_leader",
            "Cluster mode: 1 while this member refreshes the account, else 0",
            None,
            |r| r.leading,
        )?;
        self.gauge(
            encoder,
            "cluster_degraded",
            "Cluster mode: 1 while this member is cut off from etcd, else 0",
            None,
            |r| r.degraded,
        )?;
        self.gauge(
            encoder,
            "cluster_clock_skew",
            "Cluster mode: this member's clock minus the provider's (or etcd's, before the provider's is known); said when over 30 s",
            Some(&Unit::Seconds),
            |r| r.skew,
        )?;
        self.counter(
            encoder,
            "cluster_link_waits",
            "Cluster mode: refreshes put off because another member was asking the provider with the chain's current link",
            |m| &m.link_waits,
        )?;
        Ok(())
    }
}

impl Collector for AccountsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.gauge(
            &mut encoder,
            "token_expiry_timestamp",
            "When the account's current token expires (Unix time)",
            Some(&Unit::Seconds),
            |r| r.expires_at,
        )?;
        self.gauge(
            &mut encoder,
            "last_success_timestamp",
            "When the account last got a token (Unix time)",
            Some(&Unit::Seconds),
            |r| r.last_success,
        )?;
        self.gauge(
            &mut encoder,
            "token_valid",
            "1 while the account holds an unexpired token, else 0",
            None,
            |r| Some(if r.valid { 1.0 } else { 0.0 }),
        )?;
        // Only in cluster mode.
        if self.rows.iter().any(|r| r.leading.is_some()) {
            self.encode_cluster(&mut encoder)?;
        }
        self.counter(
            &mut encoder,
            "token_expirations",
            "Tokens that expired before a new one came (the outputs then follow on_expiry)",
            |m| &m.expirations,
        )?;
        {
            let mut metric = encoder.encode_descriptor(
                "account_status",
                "1 for the account's current status, 0 for the others",
                None,
                MetricType::Gauge,
            )?;
            for row in &self.rows {
                for s in STATUSES {
                    let labels = [("account", row.name.as_str()), ("status", s.as_str())];
                    let v = if row.status == s { 1.0 } else { 0.0 };
                    ConstGauge::new(v).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "refresh_attempts",
                "Token requests, by result (success, failure, rate_limited, rejected)",
                None,
                MetricType::Counter,
            )?;
            for row in &self.rows {
                let Some(m) = &row.recorded else { continue };
                for (result, counter) in RESULTS.iter().zip(&m.attempts) {
                    let labels = [("account", row.name.as_str()), ("result", result)];
                    ConstCounter::new(u64::from(counter.load(Ordering::Relaxed)))
                        .encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "refresh_duration",
            "How long token requests took",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for row in &self.rows {
            let Some(m) = &row.recorded else { continue };
            let labels = [("account", row.name.as_str())];
            m.encode_duration(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::state::{published, TokenState};
    use crate::config::parse_str;

    #[test]
    fn an_account_prepared_early_shows_counters_only_once_it_records_one() {
        let text = "[[account]]\nname = \"msk\"\ntoken_url = \"https://idp.example/token\"\n\
                    client_id = \"id\"\nclient_secret = { file = \"s\" }\n\
                    [[account.output]]\npath = \"/run/tokend/tokens/msk\"\n";
        let config = parse_str(text, std::path::Path::new("/etc/tokend/config.toml")).unwrap();
        let account = Arc::new(config.accounts.into_iter().next().unwrap());
        let (_state, rx) = published::channel(TokenState::default());
        let view = AccountView::detached(account, rx);
        let metrics = Metrics::new();
        metrics.prepare(["msk", "other"].into_iter());
        let series = "tokend_refresh_attempts_total{account=\"msk\",result=\"failure\"}";
        let text = metrics.encode([&view], SystemTime::now());
        assert!(!text.contains("account=\"msk\",result"), "{text}");
        assert!(
            !text.contains("tokend_refresh_duration_seconds_count{account=\"msk\"}"),
            "{text}"
        );

        let failed = Err(Error::Transport {
            url: "https://idp.example/token".into(),
            reason: "refused".into(),
        });
        metrics.refresh_attempt("msk", &failed, Duration::from_millis(5));
        let text = metrics.encode([&view], SystemTime::now());
        assert!(text.contains(&format!("{series} 1")), "{text}");
        assert!(
            text.contains("tokend_refresh_duration_seconds_count{account=\"msk\"} 1"),
            "{text}"
        );
    }
}
