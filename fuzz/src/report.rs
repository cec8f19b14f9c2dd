//! Counters and findings of a run, and its JSON summary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// What kind of fault a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A call returned `HETMEM_ERR_PANIC`: a panic inside hetmem, caught.
    Panic,
    /// Bytes read back differ from what the model says the memory holds.
    WrongBytes,
    /// A call with a bad argument succeeded.
    AcceptedBadInput,
    /// A call returned an error the arguments do not explain (or another error than
    /// the one they call for).
    WrongStatus,
    /// A call returned a code its comment in the header does not name.
    Undocumented,
    /// An out-pointer not set to NULL on failure, a last error message missing or
    /// left behind, a count or a JSON field that disagrees with the model.
    Contract,
    /// A thread made no progress for the watchdog's time.
    Hang,
    /// A thread of the fuzzer itself panicked (its own bug, or a library panic that
    /// escaped).
    Crash,
}

impl Kind {
    /// Its name in the JSON summary.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Panic => "panic",
            Kind::WrongBytes => "wrong_bytes",
            Kind::AcceptedBadInput => "accepted_bad_input",
            Kind::WrongStatus => "wrong_status",
            Kind::Undocumented => "undocumented_status",
            Kind::Contract => "contract",
            Kind::Hang => "hang",
            Kind::Crash => "crash",
        }
    }
}

/// One kind of fault at one call, with its first example and how often it came.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What went wrong.
    pub kind: Kind,
    /// The C function (or the Rust API call) it came from.
    pub call: String,
    /// What distinguishes it from others at the same call (a code, a case).
    pub key: String,
    /// The first occurrence: arguments, result, last error message.
    pub example: String,
    /// How many times it came.
    pub count: u64,
    /// Which of issue 15's known defects it is, if it is one.
    pub known: Option<&'static str>,
}

/// Counters and findings, shared by the threads of a run.
#[derive(Debug, Default)]
pub struct Report {
    /// Calls made (C functions, or Rust API calls in the tier leg).
    pub calls: AtomicU64,
    /// Calls made with at least one argument that is wrong on purpose.
    pub bad_inputs: AtomicU64,
    /// Calls that returned success.
    pub ok: AtomicU64,
    /// Bytes compared with the model.
    pub bytes_checked: AtomicU64,
    /// Print nothing as findings come (they are in the summary).
    pub quiet: AtomicBool,
    findings: Mutex<BTreeMap<(Kind, String, String), Finding>>,
    /// Calls by function: (succeeded, failed).
    per_call: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Other figures of the run (the tier stores' counters).
    extra: Mutex<serde_json::Map<String, serde_json::Value>>,
}

impl Report {
    /// Counts one call.
    pub fn call(&self, bad: bool, ok: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if bad {
            self.bad_inputs.fetch_add(1, Ordering::Relaxed);
        }
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a finding (the example is built only for the first of its kind).
    pub fn find(
        &self,
        kind: Kind,
        call: &str,
        key: &str,
        known: Option<&'static str>,
        example: impl FnOnce() -> String,
    ) {
        let mut f = self.findings.lock().unwrap_or_else(|e| e.into_inner());
        let k = (kind, call.to_owned(), key.to_owned());
        if let Some(e) = f.get_mut(&k) {
            e.count += 1;
            return;
        }
        let example = example();
        if !self.quiet.load(Ordering::Relaxed) {
            eprintln!(
                "finding: {} in {call} [{key}]{}: {example}",
                kind.name(),
                known.map(|k| format!(" (known: {k})")).unwrap_or_default()
            );
        }
        f.insert(
            k,
            Finding {
                kind,
                call: call.to_owned(),
                key: key.to_owned(),
                example,
                count: 1,
                known,
            },
        );
    }

    /// Adds a thread's calls by function.
    pub fn merge_calls(&self, counts: &BTreeMap<&'static str, (u64, u64)>) {
        let mut m = self.per_call.lock().unwrap_or_else(|e| e.into_inner());
        for (k, (ok, err)) in counts {
            let e = m.entry((*k).to_owned()).or_default();
            e.0 += ok;
            e.1 += err;
        }
    }

    /// Adds `v` to the figure `key` (numbers add up).
    pub fn add_extra(&self, key: &str, v: u64) {
        let mut m = self.extra.lock().unwrap_or_else(|e| e.into_inner());
        let cur = m.get(key).and_then(|x| x.as_u64()).unwrap_or(0);
        m.insert(key.to_owned(), (cur + v).into());
    }

    /// Calls by function: (succeeded, failed).
    pub fn per_call(&self) -> BTreeMap<String, (u64, u64)> {
        self.per_call
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The other figures.
    pub fn extra(&self) -> serde_json::Map<String, serde_json::Value> {
        self.extra.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every finding so far.
    pub fn findings(&self) -> Vec<Finding> {
        let f = self.findings.lock().unwrap_or_else(|e| e.into_inner());
        f.values().cloned().collect()
    }
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The seed.
    pub seed: u64,
    /// Worker threads.
    pub threads: usize,
    /// Which legs ran.
    pub legs: String,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Calls made.
    pub calls: u64,
    /// Calls with a wrong argument on purpose.
    pub bad_inputs: u64,
    /// Calls that succeeded.
    pub ok: u64,
    /// Bytes compared with the model.
    pub bytes_checked: u64,
    /// Everything found.
    pub findings: Vec<Finding>,
    /// C functions called: (succeeded, failed).
    pub per_call: BTreeMap<String, (u64, u64)>,
    /// Other figures (the tier leg's store counters).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Summary {
    /// Occurrences of findings of `kind`.
    pub fn count(&self, kind: Kind) -> u64 {
        self.findings
            .iter()
            .filter(|f| f.kind == kind)
            .map(|f| f.count)
            .sum()
    }

    /// Findings that are not among issue 15's known defects.
    pub fn new_findings(&self) -> Vec<&Finding> {
        self.findings.iter().filter(|f| f.known.is_none()).collect()
    }

    /// The summary as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        let findings: Vec<serde_json::Value> = self
            .findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "kind": f.kind.name(),
                    "call": f.call,
                    "key": f.key,
                    "count": f.count,
                    "known": f.known,
                    "example": f.example,
                })
            })
            .collect();
        serde_json::json!({
            "seed": self.seed,
            "threads": self.threads,
            "legs": self.legs,
            "seconds": (self.seconds * 10.0).round() / 10.0,
            "calls": self.calls,
            "bad_inputs": self.bad_inputs,
            "ok": self.ok,
            "bytes_checked": self.bytes_checked,
            "crashes": self.count(Kind::Crash),
            "hangs": self.count(Kind::Hang),
            "wrong_bytes": self.count(Kind::WrongBytes),
            "panics": self.count(Kind::Panic),
            "wrong_status": self.count(Kind::WrongStatus) + self.count(Kind::AcceptedBadInput),
            "undocumented": self.count(Kind::Undocumented),
            "contract": self.count(Kind::Contract),
            "new_findings": self.new_findings().len(),
            "findings": findings,
            "per_call": self.per_call.iter().map(|(k, (ok, err))| (k.clone(), serde_json::json!([ok, err]))).collect::<serde_json::Map<_, _>>(),
            "figures": self.extra,
        })
    }
}
