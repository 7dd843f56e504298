//! The audit log on disk, shared by the writer in `nhid` and by `nhictl audit tail|verify`.
//!
//! A log directory holds numbered segments `audit-00000001.jsonl`, `audit-00000002.jsonl`, ...
//! and one head file `head.json`. Each segment line is one [`Record`]: a sequence number, the
//! SHA-256 (hex) of the previous record's line (`prev`), the workload the record is about (as
//! `nhid` attached it) and the [`AuditEvent`] fields. The chain runs across segments: the first
//! record of segment N+1 names the hash of the last record of segment N. The very first record
//! of a log (segment 1) has `prev` = 64 zeros.
//!
//! `head.json` (replaced atomically) anchors the end of the chain: the last record's sequence
//! number and hash, the newest segment and the oldest segment kept. It is what makes dropping
//! the tail, or whole files, detectable: a chain alone can be cut short without a trace.
//!
//! The chain proves order and integrity against anyone who cannot rewrite the whole log and its
//! head together (a partial edit, a lost file, a truncation, a reorder). It is not a signature:
//! whoever can write every file can rebuild a consistent log, so ship the head's hash off the
//! node when that matters.
//!
//! Size: one file on purpose: the writer, the readers (`verify`, `tail`, the follower) and the
//! on-disk format they share change together, and the fault-injection tests beside them
//! (about a third of the file) exercise all three at once.

use std::fmt;
use std::fs;
use std::io::{self, BufRead, Read, Seek};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::AuditEvent;
use crate::workload::Workload;

/// `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
pub const HEAD_FILE: &str = "head.json";
const SEGMENT_PREFIX: &str = "audit-";
const SEGMENT_SUFFIX: &str = ".jsonl";
/// How far past a sequence gap `verify` looks for the missing record (reordered vs dropped).
const LOOKAHEAD: usize = 4096;

pub fn segment_name(n: u64) -> String {
    format!("{SEGMENT_PREFIX}{n:08}{SEGMENT_SUFFIX}")
}

pub fn parse_segment_name(name: &str) -> Option<u64> {
    let n = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if n.len() < 8 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// SHA-256 of one record's line (without its newline), lowercase hex.
pub fn hash_line(line: &[u8]) -> String {
    let d = Sha256::digest(line);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Who a record is about, from `nhid`'s attachment record (never from the companion).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkloadRef {
    pub container_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nomad_alloc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nomad_task: Option<String>,
}

impl From<&Workload> for WorkloadRef {
    fn from(w: &Workload) -> Self {
        let k8s = w.k8s.as_ref();
        let nomad = w.nomad.as_ref();
        WorkloadRef {
            container_id: w.container_id.clone(),
            container_name: w.container_name.clone(),
            pod_namespace: k8s.and_then(|k| k.namespace.clone()),
            pod_name: k8s.and_then(|k| k.pod.clone()),
            pod_uid: k8s.and_then(|k| k.pod_uid.clone()),
            nomad_alloc: nomad.and_then(|n| n.alloc_id.clone()),
            nomad_task: nomad.and_then(|n| n.task.clone()),
        }
    }
}

/// One line of the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Hash of the previous record's line.
    pub prev: String,
    /// The workload's SPIFFE ID; absent on records of `nhid` itself (its own drops, a break).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
    #[serde(flatten)]
    pub event: AuditEvent,
    /// On `dropped` records: how many events were lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// On `dropped` records: when the first and the last lost event happened (ms since the
    /// epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_between: Option<[u64; 2]>,
}

/// `head.json`: where the chain ends.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Head {
    /// Sequence number of the last record written (0: none yet).
    pub seq: u64,
    /// Hash of that record's line ([`GENESIS`] when none).
    pub hash: String,
    /// The segment it is in (the newest).
    pub segment: u64,
    /// The oldest segment kept (older ones were removed by rotation).
    pub first_segment: u64,
}

pub fn read_head(dir: &Path) -> io::Result<Option<Head>> {
    match fs::read(dir.join(HEAD_FILE)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{HEAD_FILE}: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Segment numbers present in `dir`, ascending.
pub fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        if let Some(n) = e.file_name().to_str().and_then(parse_segment_name) {
            v.push(n);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// One finding of [`verify`]: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The segment file (or the head file).
    pub file: PathBuf,
    /// 1-based line; 0 when the problem is the file itself.
    pub line: usize,
    /// The sequence number at that spot, when there is one.
    pub seq: Option<u64>,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// What [`verify`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verified {
    pub files: usize,
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Records after the head (written, not yet anchored: nhid is writing, or crashed between
    /// a write and the head update).
    pub unanchored: u64,
    /// Events the log says it lost (the sum over its `dropped` records): counted loss, which
    /// leaves the chain intact, unlike a problem.
    pub lost: u64,
    /// Each `dropped` record: where, and what it says.
    pub losses: Vec<Problem>,
    /// Tampering or damage: the log is not intact.
    pub problems: Vec<Problem>,
}

impl Verified {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Splits into complete lines (each ended by `\n`), numbered from 1.
fn lines_of(bytes: &[u8]) -> Vec<(usize, &[u8])> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut n = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            n += 1;
            out.push((n, &bytes[start..i]));
            start = i + 1;
        }
    }
    out
}

/// Checks the whole log in `dir`: every record parses, sequence numbers follow each other, each
/// `prev` is the hash of the record before, segments are contiguous, and the chain ends where
/// the head says. Keeps going after a problem (re-synchronizing on the record found) so one
/// run lists every spot.
pub fn verify(dir: &Path) -> io::Result<Verified> {
    let head = read_head(dir)?;
    let segs = segments(dir)?;
    let mut out = Verified::default();
    let head_path = dir.join(HEAD_FILE);
    let Some(head) = head else {
        if !segs.is_empty() {
            out.problems.push(Problem {
                file: head_path,
                line: 0,
                seq: None,
                what: "head file is missing but segments exist (deleted?)".into(),
            });
        }
        return Ok(out);
    };
    let problem = |out: &mut Verified, file: &Path, line, seq, what: String| {
        out.problems.push(Problem {
            file: file.to_path_buf(),
            line,
            seq,
            what,
        })
    };
    let first = segs
        .first()
        .copied()
        .unwrap_or(head.first_segment)
        .min(head.first_segment.max(1));
    let last = segs.last().copied().unwrap_or(0).max(head.segment);
    // (seq, hash) of the previous record; None before the first record seen.
    let mut prev: Option<(u64, String)> = None;
    let mut at_head = head.seq == 0;
    for n in first..=last {
        let path = dir.join(segment_name(n));
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if head.seq > 0 && n >= head.first_segment && n <= head.segment {
                    problem(
                        &mut out,
                        &path,
                        0,
                        None,
                        "segment is missing (deleted); the chain resumes in the next one".into(),
                    );
                    // The next record's prev cannot be checked against a file we do not have.
                    prev = None;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        out.files += 1;
        let lines = lines_of(&bytes);
        for (idx, &(lineno, line)) in lines.iter().enumerate() {
            let rec: Record = match serde_json::from_slice(line) {
                Ok(r) => r,
                Err(e) => {
                    let seq = prev.as_ref().map(|p| p.0 + 1);
                    problem(
                        &mut out,
                        &path,
                        lineno,
                        seq,
                        format!("not a valid record (changed): {e}"),
                    );
                    prev = seq.map(|s| (s, hash_line(line)));
                    continue;
                }
            };
            let hash = hash_line(line);
            out.records += 1;
            if out.records == 1 {
                out.first_seq = rec.seq;
                if n == 1 && lineno == 1 && (rec.seq != 1 || rec.prev != GENESIS) {
                    problem(
                        &mut out,
                        &path,
                        lineno,
                        Some(rec.seq),
                        "the log's first record is not seq 1 after the genesis hash (records before it dropped)".into(),
                    );
                }
            }
            if let Some((pseq, phash)) = &prev {
                let expected = pseq + 1;
                if rec.seq != expected {
                    // Bounded look-ahead: a shuffled file must not cost quadratic time.
                    let later = lines[idx + 1..].iter().take(LOOKAHEAD).any(|(_, l)| {
                        serde_json::from_slice::<Record>(l).is_ok_and(|r| r.seq == expected)
                    });
                    let what = if rec.seq <= *pseq || later {
                        format!(
                            "out of order: expected seq {expected}, found seq {} (records reordered)",
                            rec.seq
                        )
                    } else if rec.seq == expected + 1 {
                        format!("record seq {expected} is missing (dropped) before this one")
                    } else {
                        format!(
                            "records seq {expected}..={} are missing (dropped) before this one",
                            rec.seq - 1
                        )
                    };
                    problem(&mut out, &path, lineno, Some(rec.seq), what);
                } else if rec.prev != *phash {
                    let (pf, pl) = previous_spot(dir, n, &lines, idx);
                    problem(
                        &mut out,
                        &pf,
                        pl,
                        Some(*pseq),
                        format!(
                            "record changed: its hash does not match the prev recorded by seq {} ({}:{})",
                            rec.seq,
                            path.display(),
                            lineno
                        ),
                    );
                }
            }
            if rec.event.kind == crate::audit::AuditKind::Dropped {
                let n = rec.dropped.unwrap_or(0);
                out.lost += n;
                out.losses.push(Problem {
                    file: path.clone(),
                    line: lineno,
                    seq: Some(rec.seq),
                    what: format!(
                        "{n} events lost{}{}: {}",
                        match rec.spiffe_id.as_deref() {
                            Some(id) => format!(" by {id}'s companion"),
                            None => String::new(),
                        },
                        match rec.lost_between {
                            Some([a, b]) => format!(" (ts_ms {a}..={b})"),
                            None => String::new(),
                        },
                        rec.event.detail.as_deref().unwrap_or("no reason given")
                    ),
                });
            }
            if rec.event.kind == crate::audit::AuditKind::ChainBreak {
                problem(
                    &mut out,
                    &path,
                    lineno,
                    Some(rec.seq),
                    format!(
                        "nhid found the log broken when it started and began a new segment here: {}",
                        rec.event.detail.as_deref().unwrap_or("")
                    ),
                );
            }
            if rec.seq == head.seq {
                at_head = true;
                if hash != head.hash {
                    problem(
                        &mut out,
                        &path,
                        lineno,
                        Some(rec.seq),
                        "record changed: its hash does not match the head".into(),
                    );
                }
            } else if rec.seq > head.seq {
                out.unanchored += 1;
            }
            out.last_seq = rec.seq;
            prev = Some((rec.seq, hash));
        }
    }
    if !at_head || out.last_seq < head.seq {
        let (file, line) = match segs.last() {
            Some(&n) => {
                let p = dir.join(segment_name(n));
                let l = fs::read(&p).map(|b| lines_of(&b).len()).unwrap_or(0);
                (p, l)
            }
            None => (head_path, 0),
        };
        let last_seq = out.last_seq;
        problem(
            &mut out,
            &file,
            line,
            Some(last_seq),
            format!(
                "log truncated: the head says the last record is seq {}, the log ends at seq {last_seq}",
                head.seq
            ),
        );
    }
    Ok(out)
}

/// File and line of the record before `lines[idx]` (in the previous segment when `idx` is 0).
fn previous_spot(dir: &Path, seg: u64, lines: &[(usize, &[u8])], idx: usize) -> (PathBuf, usize) {
    if idx > 0 {
        return (dir.join(segment_name(seg)), lines[idx - 1].0);
    }
    let mut n = seg;
    while n > 1 {
        n -= 1;
        let p = dir.join(segment_name(n));
        if let Ok(b) = fs::read(&p) {
            return (p, lines_of(&b).len());
        }
    }
    (dir.join(segment_name(seg)), 0)
}

/// The last `n` records (of `identity` when given), oldest first, as their raw lines.
pub fn tail(dir: &Path, n: usize, identity: Option<&str>) -> io::Result<Vec<String>> {
    tail_upto(dir, n, identity, None)
}

/// [`tail`], then a [`Follower`] that goes on exactly after the last line returned (no line
/// twice, none missed).
pub fn tail_and_follow(
    dir: &Path,
    n: usize,
    identity: Option<&str>,
) -> io::Result<(Vec<String>, Follower)> {
    let f = Follower::at_end(dir, identity)?;
    let lines = tail_upto(dir, n, identity, Some((f.segment, f.offset)))?;
    Ok((lines, f))
}

fn tail_upto(
    dir: &Path,
    n: usize,
    identity: Option<&str>,
    end: Option<(u64, u64)>,
) -> io::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for seg in segments(dir)?.into_iter().rev() {
        if out.len() >= n {
            break;
        }
        let mut bytes = match end {
            Some((s, _)) if seg > s => continue,
            _ => fs::read(dir.join(segment_name(seg)))?,
        };
        if let Some((s, off)) = end {
            if seg == s {
                bytes.truncate(off as usize);
            }
        }
        let mut here: Vec<String> = lines_of(&bytes)
            .into_iter()
            .filter(|(_, l)| matches(l, identity))
            .map(|(_, l)| String::from_utf8_lossy(l).into_owned())
            .collect();
        let keep = n - out.len();
        if here.len() > keep {
            here.drain(..here.len() - keep);
        }
        here.append(&mut out);
        out = here;
    }
    Ok(out)
}

fn matches(line: &[u8], identity: Option<&str>) -> bool {
    match identity {
        None => true,
        Some(id) => {
            serde_json::from_slice::<Record>(line).is_ok_and(|r| r.spiffe_id.as_deref() == Some(id))
        }
    }
}

/// Follows the log as it grows (and rotates): each [`Follower::poll`] returns the complete
/// lines written since the last one.
pub struct Follower {
    dir: PathBuf,
    identity: Option<String>,
    segment: u64,
    offset: u64,
}

impl Follower {
    /// Starts at the current end of the log.
    pub fn at_end(dir: &Path, identity: Option<&str>) -> io::Result<Self> {
        let segment = segments(dir)?.last().copied().unwrap_or(1);
        let offset = fs::metadata(dir.join(segment_name(segment)))
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(Follower {
            dir: dir.to_path_buf(),
            identity: identity.map(str::to_string),
            segment,
            offset,
        })
    }

    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        loop {
            // A newer segment seen before reading means this one is complete: nhid never
            // writes to a segment again once it started the next.
            let newer = segments(&self.dir)?.into_iter().find(|&s| s > self.segment);
            let path = self.dir.join(segment_name(self.segment));
            match fs::File::open(&path) {
                Ok(mut f) => {
                    f.seek(io::SeekFrom::Start(self.offset))?;
                    let mut r = io::BufReader::new(f.by_ref());
                    let mut line = Vec::new();
                    loop {
                        line.clear();
                        let got = r.read_until(b'\n', &mut line)?;
                        if got == 0 || line.last() != Some(&b'\n') {
                            break;
                        }
                        self.offset += got as u64;
                        let l = &line[..line.len() - 1];
                        if matches(l, self.identity.as_deref()) {
                            out.push(String::from_utf8_lossy(l).into_owned());
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            match newer {
                Some(next) => {
                    self.segment = next;
                    self.offset = 0;
                }
                None => return Ok(out),
            }
        }
    }
}

/// How a [`Writer`] grows and flushes the log (from `[audit]`).
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    pub max_file_bytes: u64,
    /// 0 keeps every segment.
    pub max_files: u64,
    pub fsync: crate::config::Fsync,
}

impl From<&crate::config::AuditConfig> for WriterOptions {
    fn from(c: &crate::config::AuditConfig) -> Self {
        WriterOptions {
            max_file_bytes: c.max_file_bytes,
            max_files: c.max_files,
            fsync: c.fsync,
        }
    }
}

/// The file operations of a [`Writer`]: [`Disk`] in `nhid`; tests put a failing one in its
/// place ([`FaultyDisk`]) to show that no failure shape duplicates, half-writes or loses a
/// record silently.
pub trait Storage: Send + 'static {
    type File: Send;
    /// Opens segment `path` for appending (created 0600 if missing); its current length.
    fn open_append(&mut self, path: &Path) -> io::Result<(Self::File, u64)>;
    /// Appends `buf`; when it fails, any part of it may have been written.
    fn append(&mut self, file: &mut Self::File, buf: &[u8]) -> io::Result<()>;
    fn sync(&mut self, file: &mut Self::File) -> io::Result<()>;
    fn truncate(&mut self, file: &mut Self::File, len: u64) -> io::Result<()>;
    /// Replaces `dir/name` whole: the old content or the new, never a mix.
    fn replace(&mut self, dir: &Path, name: &str, bytes: &[u8], sync: bool) -> io::Result<()>;
    fn remove(&mut self, path: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct Disk;

impl Storage for Disk {
    type File = fs::File;

    fn open_append(&mut self, path: &Path) -> io::Result<(fs::File, u64)> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)?;
        let len = f.metadata()?.len();
        Ok((f, len))
    }

    fn append(&mut self, file: &mut fs::File, buf: &[u8]) -> io::Result<()> {
        io::Write::write_all(file, buf)
    }

    fn sync(&mut self, file: &mut fs::File) -> io::Result<()> {
        file.sync_data()
    }

    fn truncate(&mut self, file: &mut fs::File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }

    fn replace(&mut self, dir: &Path, name: &str, bytes: &[u8], sync: bool) -> io::Result<()> {
        write_atomic(dir, name, bytes, sync)
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// What a failed [`Writer::commit`] did not write: every record of the batch (a batch is all or
/// nothing), as audited events and their time span.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lost {
    /// Records not written.
    pub records: u64,
    /// Audited events among them (one per record; `dropped` and `chain_break` records are not
    /// events).
    pub events: u64,
    /// Events that `dropped` records among them had counted: lost earlier and now, with the
    /// record that counted them, to be counted again.
    pub recounted: u64,
    /// Time span of what was lost (ms since the epoch); 0 when nothing was.
    pub first_ms: u64,
    pub last_ms: u64,
}

impl Lost {
    /// Everything lost so far: what a `dropped` record must say.
    pub fn total(&self) -> u64 {
        self.events + self.recounted
    }

    pub fn add(&mut self, o: &Lost) {
        if o.records == 0 {
            return;
        }
        self.first_ms = if self.records == 0 {
            o.first_ms
        } else {
            self.first_ms.min(o.first_ms)
        };
        self.last_ms = self.last_ms.max(o.last_ms);
        self.records += o.records;
        self.events += o.events;
        self.recounted += o.recounted;
    }
}

/// A [`Writer::commit`] that failed: what was still written, what was not, and why.
#[derive(Debug, thiserror::Error)]
#[error("{source}{}", .lost.map(|l| format!(" ({} records not written)", l.records)).unwrap_or_default())]
pub struct CommitError {
    /// Records written (they are part of the chain, only the head may lag behind them).
    pub written: u64,
    /// Records not written: the chain does not contain them and continues as if they had never
    /// been appended. `None` when only the head update or retention failed.
    pub lost: Option<Lost>,
    pub source: io::Error,
}

/// One appended record waiting for [`Writer::commit`].
struct Pending {
    /// The line with its newline.
    line: Vec<u8>,
    lost: Lost,
}

/// The one writer of a log directory (`nhid` holds its state-dir lock). Records are chained and
/// buffered by [`Writer::append`] and reach the files and the head with [`Writer::commit`].
///
/// Failure semantics: a commit writes its whole batch or none of it. When a write fails (full
/// disk, I/O error), whatever part of the batch reached a segment is cut off again (a segment it
/// had just begun is removed) and the chain goes on from the last record written, as if the
/// batch had never been appended; the commit error says what was lost, for the caller to record
/// as a `dropped` record once writing works again. Until such a cut-back succeeds nothing more
/// is written. A failed head update loses nothing: the records are in the segment, the next
/// commit writes the head.
pub struct Writer<S: Storage = Disk> {
    dir: PathBuf,
    opts: WriterOptions,
    storage: S,
    /// The newest segment, once opened.
    file: Option<S::File>,
    segment: u64,
    /// Bytes of `segment` that hold written records.
    size: u64,
    /// The last record written: its seq and hash.
    seq: u64,
    last_hash: String,
    first_segment: u64,
    head_dirty: bool,
    pending: Vec<Pending>,
    /// The chain's end counting the pending records.
    tip_seq: u64,
    tip_hash: String,
    /// Cut-backs of a failed write that failed themselves: (segment, length; 0 = remove).
    uncut: Vec<(u64, u64)>,
}

/// The end of the chain found on disk: (segment, seq, hash).
type Tail = (u64, u64, String);

impl Writer<Disk> {
    /// Opens the log in `dir` (created 0700 if missing) and resumes its chain. When the chain
    /// on disk does not end where its head says (a truncated, edited or deleted file), it never
    /// appends to it: it begins a new segment and returns why, for the caller to write as a
    /// [`crate::audit::AuditKind::ChainBreak`] record first. An incomplete last line (a crash
    /// in the middle of a write, never anchored by the head) is cut off.
    pub fn open(dir: &Path, opts: WriterOptions) -> io::Result<(Writer, Option<String>)> {
        Writer::open_with(dir, opts, Disk)
    }
}

impl<S: Storage> Writer<S> {
    /// [`Writer::open`] writing through `storage`.
    pub fn open_with(
        dir: &Path,
        opts: WriterOptions,
        storage: S,
    ) -> io::Result<(Writer<S>, Option<String>)> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let segs = segments(dir)?;
        let head = read_head(dir);
        let mut w = Writer {
            dir: dir.to_path_buf(),
            opts,
            storage,
            file: None,
            segment: 1,
            size: 0,
            seq: 0,
            last_hash: GENESIS.into(),
            first_segment: segs.first().copied().unwrap_or(1),
            head_dirty: false,
            pending: Vec::new(),
            tip_seq: 0,
            tip_hash: GENESIS.into(),
            uncut: Vec::new(),
        };
        let head = match head {
            Ok(h) => h,
            Err(e) => {
                let tail = disk_tail(dir, &segs)?;
                let why = format!("head file unreadable ({e})");
                w.start_after_break(&segs, None, tail);
                return Ok((w, Some(why)));
            }
        };
        let tail = disk_tail(dir, &segs)?;
        let verdict = match (&head, &tail) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err("head file missing while segments exist".to_string()),
            (Some(h), None) if h.seq == 0 => Ok(()),
            (Some(h), None) => Err(format!(
                "head says the last record is seq {} but no record is on disk",
                h.seq
            )),
            (Some(h), Some((_, seq, hash))) if *seq == h.seq && *hash == h.hash => Ok(()),
            (Some(h), Some((_, seq, _))) if *seq == h.seq => Err(format!(
                "the last record (seq {seq}) does not match the head's hash (changed)"
            )),
            (Some(h), Some((_, seq, _))) if *seq < h.seq => Err(format!(
                "the log ends at seq {seq} but the head says seq {} (truncated)",
                h.seq
            )),
            (Some(h), Some(_)) => chain_after(dir, h, &segs),
        };
        match verdict {
            Ok(()) => {
                if let Some((seg, seq, hash)) = &tail {
                    w.seq = *seq;
                    w.last_hash = hash.clone();
                    w.segment = *seg;
                }
                if let Some(h) = &head {
                    w.first_segment = h.first_segment.max(1);
                    w.segment = w.segment.max(h.segment);
                }
                w.segment = w.segment.max(segs.last().copied().unwrap_or(1));
                if tail.is_some() || head.is_some() {
                    let (f, len) = w
                        .storage
                        .open_append(&w.dir.join(segment_name(w.segment)))?;
                    w.file = Some(f);
                    w.size = len;
                } else {
                    // A new log: its head (seq 0) is written at once, so records written before
                    // a crash that precedes the first head update still chain on from a head.
                    w.head_dirty = true;
                }
                w.head_dirty |= tail.as_ref().map(|t| t.1) != head.as_ref().map(|h| h.seq);
                w.tip_seq = w.seq;
                w.tip_hash = w.last_hash.clone();
                Ok((w, None))
            }
            Err(why) => {
                w.start_after_break(&segs, head.as_ref(), tail);
                Ok((w, Some(why)))
            }
        }
    }

    fn start_after_break(&mut self, segs: &[u64], head: Option<&Head>, tail: Option<Tail>) {
        let newest = segs
            .last()
            .copied()
            .unwrap_or(0)
            .max(head.map_or(0, |h| h.segment));
        self.segment = newest + 1;
        self.size = 0;
        self.file = None;
        let (tseq, thash) = tail.map_or((0, GENESIS.to_string()), |(_, s, h)| (s, h));
        self.seq = tseq.max(head.map_or(0, |h| h.seq));
        self.last_hash = thash;
        self.tip_seq = self.seq;
        self.tip_hash = self.last_hash.clone();
        self.first_segment = segs
            .first()
            .copied()
            .or(head.map(|h| h.first_segment))
            .unwrap_or(self.segment);
        self.head_dirty = true;
    }

    /// Sequence number of the last record written.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn segment(&self) -> u64 {
        self.segment
    }

    /// Records appended and not yet committed.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Chains `rec` after the last record appended (its `seq` and `prev` are set here) and
    /// buffers its line; returns its seq. Nothing is written before [`Writer::commit`].
    pub fn append(&mut self, mut rec: Record) -> io::Result<u64> {
        rec.seq = self.tip_seq + 1;
        rec.prev = self.tip_hash.clone();
        let mut line = serde_json::to_vec(&rec).map_err(io::Error::other)?;
        let hash = hash_line(&line);
        line.push(b'\n');
        let ts = rec.event.ts_ms;
        // A `dropped` record's span is that of what it counts, not its own time.
        let (first_ms, last_ms) = match rec.lost_between {
            Some([a, b]) => (a, b),
            None => (ts, ts),
        };
        let (events, recounted) = match rec.event.kind {
            crate::audit::AuditKind::Dropped => (0, rec.dropped.unwrap_or(0)),
            crate::audit::AuditKind::ChainBreak => (0, 0),
            _ => (1, 0),
        };
        self.pending.push(Pending {
            line,
            lost: Lost {
                records: 1,
                events,
                recounted,
                first_ms,
                last_ms,
            },
        });
        self.tip_seq = rec.seq;
        self.tip_hash = hash;
        Ok(rec.seq)
    }

    /// Writes the appended records (all or none, see [`Writer`]), syncs per the fsync policy,
    /// replaces the head, and removes segments beyond `max_files`. Returns how many records it
    /// wrote.
    pub fn commit(&mut self) -> Result<u64, CommitError> {
        let mut written = 0;
        if !self.pending.is_empty() {
            match self.write_pending() {
                Ok(()) => {
                    written = self.pending.len() as u64;
                    self.pending.clear();
                    self.seq = self.tip_seq;
                    self.last_hash = self.tip_hash.clone();
                    self.head_dirty = true;
                }
                Err(source) => {
                    let mut lost = Lost::default();
                    for p in self.pending.drain(..) {
                        lost.add(&p.lost);
                    }
                    self.tip_seq = self.seq;
                    self.tip_hash = self.last_hash.clone();
                    return Err(CommitError {
                        written: 0,
                        lost: Some(lost),
                        source,
                    });
                }
            }
        }
        if !self.head_dirty {
            return Ok(written);
        }
        let fail = |source| CommitError {
            written,
            lost: None,
            source,
        };
        let sync = self.opts.fsync != crate::config::Fsync::Never;
        let keep_from = if self.opts.max_files > 0 && self.segment >= self.opts.max_files {
            (self.segment + 1 - self.opts.max_files).max(self.first_segment)
        } else {
            self.first_segment
        };
        let head = Head {
            seq: self.seq,
            hash: self.last_hash.clone(),
            segment: self.segment,
            first_segment: keep_from,
        };
        let bytes = serde_json::to_vec(&head).map_err(|e| fail(io::Error::other(e)))?;
        self.storage
            .replace(&self.dir, HEAD_FILE, &bytes, sync)
            .map_err(fail)?;
        self.head_dirty = false;
        // The head names the new oldest segment before the older ones go.
        while self.first_segment < keep_from {
            self.storage
                .remove(&self.dir.join(segment_name(self.first_segment)))
                .map_err(fail)?;
            self.first_segment += 1;
        }
        Ok(written)
    }

    /// Writes every pending line, opening new segments as they fill; on failure cuts back
    /// whatever reached the files.
    fn write_pending(&mut self) -> io::Result<()> {
        self.cut_back()?;
        let mut fresh: Vec<(u64, S::File)> = Vec::new();
        match self.write_lines(&mut fresh) {
            Ok(size) => {
                if let Some((n, f)) = fresh.pop() {
                    self.segment = n;
                    self.file = Some(f);
                }
                self.size = size;
                Ok(())
            }
            Err(e) => {
                for (n, mut f) in fresh.into_iter().rev() {
                    let path = self.dir.join(segment_name(n));
                    let cut = self.storage.truncate(&mut f, 0);
                    drop(f);
                    if cut.and_then(|()| self.storage.remove(&path)).is_err() {
                        self.uncut.push((n, 0));
                    }
                }
                if let Some(f) = self.file.as_mut() {
                    if self.storage.truncate(f, self.size).is_err() {
                        self.uncut.push((self.segment, self.size));
                    }
                }
                Err(e)
            }
        }
    }

    /// Retries the cut-backs that failed before (nothing is written after a partial record).
    fn cut_back(&mut self) -> io::Result<()> {
        while let Some(&(n, len)) = self.uncut.last() {
            match self.file.as_mut() {
                Some(f) if n == self.segment => self.storage.truncate(f, len)?,
                _ => self.storage.remove(&self.dir.join(segment_name(n)))?,
            }
            self.uncut.pop();
        }
        Ok(())
    }

    /// The segment being filled: the newest one opened by this commit, else the current one.
    fn target<'a>(
        file: &'a mut Option<S::File>,
        fresh: &'a mut [(u64, S::File)],
    ) -> Option<&'a mut S::File> {
        match fresh.last_mut() {
            Some((_, f)) => Some(f),
            None => file.as_mut(),
        }
    }

    /// Appends the pending lines; returns the size of the last segment written to.
    fn write_lines(&mut self, fresh: &mut Vec<(u64, S::File)>) -> io::Result<u64> {
        use crate::config::Fsync;
        let max = self.opts.max_file_bytes;
        let sync = self.opts.fsync != Fsync::Never;
        let always = self.opts.fsync == Fsync::Always;
        let Writer {
            dir,
            storage,
            file,
            pending,
            segment,
            size,
            ..
        } = self;
        let (mut seg, mut size) = (*segment, *size);
        let mut buf: Vec<u8> = Vec::new();
        for p in pending.iter() {
            let len = p.line.len() as u64;
            let have_file = file.is_some() || !fresh.is_empty();
            if !have_file || (size > 0 && size + len > max) {
                if let Some(f) = Self::target(file, fresh) {
                    storage.append(f, &buf)?;
                    buf.clear();
                    if sync {
                        storage.sync(f)?;
                    }
                    seg += 1;
                }
                let (f, len0) = storage.open_append(&dir.join(segment_name(seg)))?;
                fresh.push((seg, f));
                size = len0;
            }
            buf.extend_from_slice(&p.line);
            size += len;
            if always {
                let f = Self::target(file, fresh).expect("a segment is open");
                storage.append(f, &buf)?;
                buf.clear();
                storage.sync(f)?;
            }
        }
        let f = Self::target(file, fresh).expect("a segment is open");
        if !buf.is_empty() {
            storage.append(f, &buf)?;
        }
        if sync && !always {
            storage.sync(f)?;
        }
        Ok(size)
    }
}

/// A [`Storage`] over the real disk that fails on command, to drill every failure shape of a
/// full or failing disk (tests, fault-injection runs). Clones share one set of [`Faults`].
#[derive(Debug, Clone, Default)]
pub struct FaultyDisk {
    pub faults: std::sync::Arc<std::sync::Mutex<Faults>>,
}

/// What [`FaultyDisk`] does wrong.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Bytes of segment data that still fit; past them an append writes what fits and fails
    /// with ENOSPC (`Some(0)`: before any byte). `None`: no limit.
    pub space: Option<u64>,
    /// Opening a segment that does not exist yet fails with ENOSPC.
    pub fail_new_segment: bool,
    /// Replacing the head fails with ENOSPC.
    pub fail_head: bool,
    /// Cutting a segment back fails with EIO.
    pub fail_truncate: bool,
}

impl FaultyDisk {
    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl Storage for FaultyDisk {
    type File = fs::File;

    fn open_append(&mut self, path: &Path) -> io::Result<(fs::File, u64)> {
        if self.faults().fail_new_segment && !path.exists() {
            return Err(enospc());
        }
        Disk.open_append(path)
    }

    fn append(&mut self, file: &mut fs::File, buf: &[u8]) -> io::Result<()> {
        let mut faults = self.faults();
        match faults.space {
            Some(room) if (buf.len() as u64) > room => {
                io::Write::write_all(file, &buf[..room as usize])?;
                faults.space = Some(0);
                Err(enospc())
            }
            Some(room) => {
                faults.space = Some(room - buf.len() as u64);
                io::Write::write_all(file, buf)
            }
            None => io::Write::write_all(file, buf),
        }
    }

    fn sync(&mut self, file: &mut fs::File) -> io::Result<()> {
        Disk.sync(file)
    }

    fn truncate(&mut self, file: &mut fs::File, len: u64) -> io::Result<()> {
        if self.faults().fail_truncate {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Disk.truncate(file, len)
    }

    fn replace(&mut self, dir: &Path, name: &str, bytes: &[u8], sync: bool) -> io::Result<()> {
        if self.faults().fail_head {
            return Err(enospc());
        }
        Disk.replace(dir, name, bytes, sync)
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        Disk.remove(path)
    }
}

/// Replaces `dir/name` whole (mode 0600). No directory fsync: a crash may bring back the
/// previous head, and records after the head are resumed (they chain on from it), never a break.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], sync: bool) -> io::Result<()> {
    use crate::atomic_file::{replace, Durability, Mode, Options};
    let durability = if sync {
        Durability::Data
    } else {
        Durability::Rename
    };
    let opts = Options {
        mode: Mode::Fixed(0o600),
        owner: None,
        durability,
    };
    replace(&dir.join(name), bytes, &opts)
}

/// The last complete record on disk, cutting an incomplete last line off the newest segment.
fn disk_tail(dir: &Path, segs: &[u64]) -> io::Result<Option<Tail>> {
    for (i, &n) in segs.iter().enumerate().rev() {
        let path = dir.join(segment_name(n));
        let bytes = fs::read(&path)?;
        let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        if end < bytes.len() && i == segs.len() - 1 {
            let f = fs::OpenOptions::new().write(true).open(&path)?;
            f.set_len(end as u64)?;
        }
        if let Some(&(_, line)) = lines_of(&bytes[..end]).last() {
            let seq = serde_json::from_slice::<Record>(line)
                .map(|r| r.seq)
                .unwrap_or(0);
            return Ok(Some((n, seq, hash_line(line))));
        }
    }
    Ok(None)
}

/// Records written after the head (a crash between a write and the head update): fine if the
/// head's record is there and the chain runs on from it.
fn chain_after(dir: &Path, h: &Head, segs: &[u64]) -> Result<(), String> {
    let mut prev: Option<(u64, String)> = None;
    for &n in segs.iter().filter(|&&n| n >= h.segment) {
        let bytes = fs::read(dir.join(segment_name(n))).map_err(|e| e.to_string())?;
        for (_, line) in lines_of(&bytes) {
            let Ok(r) = serde_json::from_slice::<Record>(line) else {
                if prev.is_some() {
                    return Err("an unreadable record after the head".into());
                }
                continue;
            };
            let hash = hash_line(line);
            match &prev {
                None if r.seq == h.seq => {
                    if hash != h.hash {
                        return Err(format!(
                            "record seq {} does not match the head's hash (changed)",
                            h.seq
                        ));
                    }
                    prev = Some((r.seq, hash));
                }
                None => {}
                Some((ps, ph)) => {
                    if r.seq != ps + 1 || r.prev != *ph {
                        return Err(format!("the chain breaks after the head at seq {}", r.seq));
                    }
                    prev = Some((r.seq, hash));
                }
            }
        }
    }
    match prev {
        Some(_) => Ok(()),
        None if h.seq == 0 => Ok(()),
        None => Err(format!("the head's record (seq {}) is not on disk", h.seq)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditKind, CredentialRef, Decision};
    use crate::config::Fsync;

    fn opts(max_file_bytes: u64, max_files: u64) -> WriterOptions {
        WriterOptions {
            max_file_bytes,
            max_files,
            fsync: Fsync::Batch,
        }
    }

    fn rec(i: u64) -> Record {
        Record {
            spiffe_id: Some(format!("spiffe://td/w{}", i % 3)),
            workload: Some(WorkloadRef {
                container_id: format!("c{}", i % 3),
                ..Default::default()
            }),
            event: AuditEvent {
                ts_ms: 1_700_000_000_000 + i,
                kind: AuditKind::Credential,
                decision: Decision::Allow,
                credential: Some(CredentialRef {
                    name: "jwt-svid".into(),
                    version: Some(format!("jti-{i}")),
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn write(dir: &Path, from: u64, n: u64, o: WriterOptions) -> Option<String> {
        let (mut w, broken) = Writer::open(dir, o).unwrap();
        if let Some(why) = &broken {
            w.append(Record {
                event: AuditEvent {
                    kind: AuditKind::ChainBreak,
                    detail: Some(why.clone()),
                    ..Default::default()
                },
                ..Default::default()
            })
            .unwrap();
        }
        for i in from..from + n {
            w.append(rec(i)).unwrap();
            if i % 7 == 0 {
                w.commit().unwrap();
            }
        }
        w.commit().unwrap();
        broken
    }

    fn seg_path(dir: &Path, n: u64) -> PathBuf {
        dir.join(segment_name(n))
    }

    fn edit_lines(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
        let text = fs::read_to_string(path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        f(&mut lines);
        let mut out = lines.join("\n");
        if !lines.is_empty() {
            out.push('\n');
        }
        fs::write(path, out).unwrap();
    }

    fn single_problem(dir: &Path) -> String {
        let v = verify(dir).unwrap();
        assert!(!v.ok(), "tampering not detected");
        v.problems[0].to_string()
    }

    #[test]
    fn a_clean_log_verifies_with_mode_0600_and_a_genesis_start() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        assert_eq!(write(d.path(), 1, 50, opts(1 << 20, 0)), None);
        let v = verify(d.path()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(
            (v.records, v.first_seq, v.last_seq, v.files),
            (50, 1, 50, 1)
        );
        let mode = fs::metadata(seg_path(d.path(), 1))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let first: Record = serde_json::from_str(
            fs::read_to_string(seg_path(d.path(), 1))
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!((first.seq, first.prev.as_str()), (1, GENESIS));
        // An empty directory is a valid, empty log.
        let e = tempfile::tempdir().unwrap();
        assert!(verify(e.path()).unwrap().ok());
    }

    #[test]
    fn an_edited_record_is_named_by_file_line_and_seq() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 30, opts(1 << 20, 0));
        let p = seg_path(d.path(), 1);
        edit_lines(&p, |l| l[11] = l[11].replace("\"allow\"", "\"deny\""));
        let msg = single_problem(d.path());
        assert!(
            msg.contains(&format!("{}:12 (seq 12)", p.display())),
            "{msg}"
        );
        assert!(msg.contains("changed"), "{msg}");
    }

    #[test]
    fn an_edited_last_record_is_caught_by_the_head() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 30, opts(1 << 20, 0));
        let p = seg_path(d.path(), 1);
        edit_lines(&p, |l| l[29] = l[29].replace("jti-30", "jti-99"));
        let msg = single_problem(d.path());
        assert!(
            msg.contains(":30 (seq 30)") && msg.contains("head"),
            "{msg}"
        );
    }

    #[test]
    fn a_deleted_record_is_named() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 30, opts(1 << 20, 0));
        let p = seg_path(d.path(), 1);
        edit_lines(&p, |l| {
            l.remove(9);
        });
        let msg = single_problem(d.path());
        assert!(msg.contains(":10 (seq 11)"), "{msg}");
        assert!(msg.contains("seq 10 is missing (dropped)"), "{msg}");
    }

    #[test]
    fn reordered_records_are_named() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 30, opts(1 << 20, 0));
        let p = seg_path(d.path(), 1);
        edit_lines(&p, |l| l.swap(4, 5));
        let msg = single_problem(d.path());
        assert!(
            msg.contains(":5 (seq 6)") && msg.contains("out of order"),
            "{msg}"
        );
    }

    #[test]
    fn a_truncated_tail_is_detected_through_the_head() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 30, opts(1 << 20, 0));
        let p = seg_path(d.path(), 1);
        edit_lines(&p, |l| l.truncate(27));
        let msg = single_problem(d.path());
        assert!(
            msg.contains("truncated") && msg.contains("seq 30") && msg.contains("seq 27"),
            "{msg}"
        );
        // Removing the head too is noticed.
        fs::remove_file(d.path().join(HEAD_FILE)).unwrap();
        assert!(single_problem(d.path()).contains("head file is missing"));
    }

    #[test]
    fn rotation_keeps_the_chain_and_dropped_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 200, opts(4096, 0));
        let segs = segments(d.path()).unwrap();
        assert!(segs.len() >= 3, "{segs:?}");
        for &n in &segs {
            assert!(fs::metadata(seg_path(d.path(), n)).unwrap().len() <= 4096);
        }
        let v = verify(d.path()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!((v.records, v.files), (200, segs.len()));
        // The first record of segment 2 names the hash of segment 1's last.
        let l1 = fs::read_to_string(seg_path(d.path(), 1)).unwrap();
        let last1 = l1.lines().last().unwrap();
        let l2 = fs::read_to_string(seg_path(d.path(), 2)).unwrap();
        let first2: Record = serde_json::from_str(l2.lines().next().unwrap()).unwrap();
        assert_eq!(first2.prev, hash_line(last1.as_bytes()));

        let mid = tempfile::tempdir().unwrap();
        for &n in &segs {
            fs::copy(seg_path(d.path(), n), seg_path(mid.path(), n)).unwrap();
        }
        fs::copy(d.path().join(HEAD_FILE), mid.path().join(HEAD_FILE)).unwrap();
        fs::remove_file(seg_path(mid.path(), 2)).unwrap();
        let msg = single_problem(mid.path());
        assert!(
            msg.contains(&segment_name(2)) && msg.contains("missing"),
            "{msg}"
        );
        fs::remove_file(seg_path(d.path(), 1)).unwrap();
        let msg = single_problem(d.path());
        assert!(
            msg.contains(&segment_name(1)) && msg.contains("missing"),
            "{msg}"
        );
    }

    #[test]
    fn max_files_prunes_the_oldest_and_what_is_left_verifies() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 200, opts(4096, 2));
        let segs = segments(d.path()).unwrap();
        assert_eq!(segs.len(), 2, "{segs:?}");
        let v = verify(d.path()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        assert!(v.first_seq > 1 && v.last_seq == 200, "{v:?}");
    }

    #[test]
    fn a_restart_resumes_the_chain() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 40, opts(4096, 0));
        assert_eq!(write(d.path(), 41, 40, opts(4096, 0)), None);
        let v = verify(d.path()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!((v.records, v.last_seq), (80, 80));
        // A crash mid-line: the incomplete line is cut, the chain goes on.
        let last = *segments(d.path()).unwrap().last().unwrap();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(seg_path(d.path(), last))
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"seq\":81,\"pr").unwrap();
        assert!(
            verify(d.path()).unwrap().ok(),
            "a partial line is not yet a record"
        );
        assert_eq!(write(d.path(), 81, 5, opts(4096, 0)), None);
        let v = verify(d.path()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(v.last_seq, 85);
    }

    #[test]
    fn records_written_after_the_head_are_resumed_not_broken() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 10, opts(1 << 20, 0));
        let head = read_head(d.path()).unwrap().unwrap();
        write(d.path(), 11, 5, opts(1 << 20, 0));
        // Put the old head back: as if nhid crashed before updating it.
        fs::write(d.path().join(HEAD_FILE), serde_json::to_vec(&head).unwrap()).unwrap();
        let v = verify(d.path()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(v.unanchored, 5);
        assert_eq!(write(d.path(), 16, 1, opts(1 << 20, 0)), None);
        assert!(verify(d.path()).unwrap().ok());
    }

    #[test]
    fn a_new_log_has_a_head_at_once_so_a_crash_before_its_first_update_is_resumed() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, broken) = Writer::open(d.path(), opts(1 << 20, 0)).unwrap();
        assert!(broken.is_none());
        w.commit().unwrap();
        let empty = fs::read(d.path().join(HEAD_FILE)).unwrap();
        let v = verify(d.path()).unwrap();
        assert!(v.ok() && v.records == 0, "{v:?}");
        for i in 1..=5 {
            w.append(rec(i)).unwrap();
        }
        w.commit().unwrap();
        drop(w);
        fs::write(d.path().join(HEAD_FILE), empty).unwrap();
        let v = verify(d.path()).unwrap();
        assert!(v.ok() && v.unanchored == 5, "{v:?}");
        assert_eq!(write(d.path(), 6, 1, opts(1 << 20, 0)), None);
        let v = verify(d.path()).unwrap();
        assert!(v.ok() && v.last_seq == 6 && v.unanchored == 0, "{v:?}");
    }

    #[test]
    fn workload_metadata_comes_from_the_attachment() {
        let w = Workload {
            container_id: "c1".into(),
            k8s: Some(crate::workload::K8s {
                namespace: Some("shop".into()),
                pod: Some("web-1".into()),
                pod_uid: Some("u-1".into()),
                ..Default::default()
            }),
            nomad: Some(crate::workload::Nomad {
                alloc_id: Some("a-1".into()),
                task: Some("api".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = WorkloadRef::from(&w);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"container_id":"c1","pod_namespace":"shop","pod_name":"web-1","pod_uid":"u-1","nomad_alloc":"a-1","nomad_task":"api"}"#
        );
    }

    #[test]
    fn nhid_never_appends_to_a_broken_chain_and_the_break_stays_visible() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 30, opts(1 << 20, 0));
        edit_lines(&seg_path(d.path(), 1), |l| l.truncate(25));
        let why = write(d.path(), 31, 5, opts(1 << 20, 0)).expect("break detected at open");
        assert!(why.contains("truncated"), "{why}");
        assert_eq!(segments(d.path()).unwrap(), vec![1, 2], "a new segment");
        let v = verify(d.path()).unwrap();
        let all: Vec<String> = v.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            all.iter().any(|p| p.contains("seq 26..=30 are missing")),
            "{all:?}"
        );
        assert!(
            all.iter().any(|p| p.contains("broken when it started")),
            "{all:?}"
        );
    }

    /// A writer whose disk fails on command, and a handle to command it.
    fn faulty(dir: &Path, o: WriterOptions) -> (Writer<FaultyDisk>, FaultyDisk) {
        let disk = FaultyDisk::default();
        let (w, broken) = Writer::open_with(dir, o, disk.clone()).unwrap();
        assert!(broken.is_none());
        (w, disk)
    }

    fn loss_record(lost: &Lost) -> Record {
        Record {
            event: AuditEvent {
                ts_ms: lost.last_ms + 1,
                kind: AuditKind::Dropped,
                decision: Decision::Error,
                detail: Some(format!("{} events could not be written", lost.total())),
                ..Default::default()
            },
            dropped: Some(lost.total()),
            lost_between: Some([lost.first_ms, lost.last_ms]),
            ..Default::default()
        }
    }

    /// Every byte of every segment is a complete, chained record; what was appended is either
    /// written or counted by a `dropped` record, exactly.
    fn assert_intact(dir: &Path, appended: u64) {
        for n in segments(dir).unwrap() {
            let bytes = fs::read(seg_path(dir, n)).unwrap();
            assert!(
                bytes.is_empty() || bytes.ends_with(b"\n"),
                "a half-written line in {}",
                segment_name(n)
            );
        }
        let v = verify(dir).unwrap();
        assert!(
            v.ok(),
            "loss must never look like tampering: {:?}",
            v.problems
        );
        let events = tail(dir, usize::MAX, None)
            .unwrap()
            .iter()
            .filter(|l| !l.contains("\"kind\":\"dropped\""))
            .count() as u64;
        assert_eq!(events + v.lost, appended, "written + dropped = appended");
    }

    #[test]
    fn enospc_before_any_byte_loses_the_batch_counted_and_the_chain_goes_on() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, disk) = faulty(d.path(), opts(1 << 20, 0));
        for i in 1..=10 {
            w.append(rec(i)).unwrap();
        }
        assert_eq!(w.commit().unwrap(), 10);
        let before = fs::read(seg_path(d.path(), 1)).unwrap();
        disk.faults.lock().unwrap().space = Some(0);
        for i in 11..=15 {
            w.append(rec(i)).unwrap();
        }
        let e = w.commit().unwrap_err();
        let lost = e.lost.expect("the batch is lost");
        assert_eq!((lost.records, lost.events, e.written), (5, 5, 0));
        assert_eq!(
            (lost.first_ms, lost.last_ms),
            (rec(11).event.ts_ms, rec(15).event.ts_ms)
        );
        assert_eq!(e.source.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(fs::read(seg_path(d.path(), 1)).unwrap(), before);
        assert_eq!(w.seq(), 10, "seq advances only for records written");
        // Space returns: the loss is recorded and the chain continues from seq 10.
        disk.faults.lock().unwrap().space = None;
        assert_eq!(w.append(loss_record(&lost)).unwrap(), 11);
        w.append(rec(16)).unwrap();
        assert_eq!(w.commit().unwrap(), 2);
        assert_intact(d.path(), 16);
        assert_eq!(verify(d.path()).unwrap().lost, 5);
    }

    #[test]
    fn a_partial_write_is_cut_back_never_duplicated_or_left_half_written() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, disk) = faulty(d.path(), opts(1 << 20, 0));
        for i in 1..=10 {
            w.append(rec(i)).unwrap();
        }
        w.commit().unwrap();
        let len = fs::metadata(seg_path(d.path(), 1)).unwrap().len();
        // Room for one and a half records of the next batch.
        disk.faults.lock().unwrap().space = Some(len / 10 * 3 / 2);
        for i in 11..=14 {
            w.append(rec(i)).unwrap();
        }
        let lost = w.commit().unwrap_err().lost.unwrap();
        assert_eq!(lost.events, 4);
        assert_eq!(fs::metadata(seg_path(d.path(), 1)).unwrap().len(), len);
        // Still full: a dropped record and new events are lost too, and counted again.
        for i in 15..=16 {
            w.append(rec(i)).unwrap();
        }
        w.append(loss_record(&lost)).unwrap();
        let again = w.commit().unwrap_err().lost.unwrap();
        assert_eq!((again.events, again.recounted, again.total()), (2, 4, 6));
        let mut total = lost;
        total.events = 0;
        total.recounted = 0;
        total.records = 0;
        total.add(&again);
        disk.faults.lock().unwrap().space = None;
        w.append(loss_record(&total)).unwrap();
        w.append(rec(17)).unwrap();
        w.commit().unwrap();
        assert_intact(d.path(), 17);
        let v = verify(d.path()).unwrap();
        assert_eq!((v.lost, v.losses.len(), v.last_seq), (6, 1, 12));
    }

    #[test]
    fn a_failed_head_update_loses_nothing_and_is_retried() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, disk) = faulty(d.path(), opts(1 << 20, 0));
        for i in 1..=5 {
            w.append(rec(i)).unwrap();
        }
        w.commit().unwrap();
        disk.faults.lock().unwrap().fail_head = true;
        for i in 6..=8 {
            w.append(rec(i)).unwrap();
        }
        let e = w.commit().unwrap_err();
        assert_eq!((e.written, e.lost), (3, None), "the records are written");
        assert_eq!(w.seq(), 8);
        let v = verify(d.path()).unwrap();
        assert!(v.ok() && v.unanchored == 3, "{v:?}");
        disk.faults.lock().unwrap().fail_head = false;
        assert_eq!(w.commit().unwrap(), 0);
        let v = verify(d.path()).unwrap();
        assert!(v.ok() && v.unanchored == 0 && v.last_seq == 8, "{v:?}");
        assert_intact(d.path(), 8);
    }

    #[test]
    fn a_failure_across_a_segment_switch_removes_the_new_segment_and_keeps_the_chain() {
        let d = tempfile::tempdir().unwrap();
        // ~330-byte records, 1000-byte segments: three per segment.
        let (mut w, disk) = faulty(d.path(), opts(1000, 0));
        for i in 1..=2 {
            w.append(rec(i)).unwrap();
        }
        w.commit().unwrap();
        let len1 = fs::metadata(seg_path(d.path(), 1)).unwrap().len();
        // The batch fills segment 1 and fails in segment 2.
        disk.faults.lock().unwrap().space = Some(len1 / 2 + len1 / 4);
        for i in 3..=6 {
            w.append(rec(i)).unwrap();
        }
        let lost = w.commit().unwrap_err().lost.unwrap();
        assert_eq!(lost.events, 4);
        assert_eq!(
            segments(d.path()).unwrap(),
            vec![1],
            "the begun segment is gone"
        );
        assert_eq!(fs::metadata(seg_path(d.path(), 1)).unwrap().len(), len1);
        // The next segment cannot even be created.
        disk.faults.lock().unwrap().space = None;
        disk.faults.lock().unwrap().fail_new_segment = true;
        for i in 7..=10 {
            w.append(rec(i)).unwrap();
        }
        let lost2 = w.commit().unwrap_err().lost.unwrap();
        assert_eq!(lost2.events, 4);
        assert_eq!(segments(d.path()).unwrap(), vec![1]);
        assert_eq!(fs::metadata(seg_path(d.path(), 1)).unwrap().len(), len1);
        disk.faults.lock().unwrap().fail_new_segment = false;
        let mut all = lost;
        all.add(&lost2);
        w.append(loss_record(&all)).unwrap();
        for i in 11..=14 {
            w.append(rec(i)).unwrap();
        }
        w.commit().unwrap();
        assert!(segments(d.path()).unwrap().len() >= 2);
        assert_intact(d.path(), 14);
        // The first record of segment 2 names the hash of segment 1's last.
        let l1 = fs::read_to_string(seg_path(d.path(), 1)).unwrap();
        let l2 = fs::read_to_string(seg_path(d.path(), 2)).unwrap();
        let first2: Record = serde_json::from_str(l2.lines().next().unwrap()).unwrap();
        assert_eq!(
            first2.prev,
            hash_line(l1.lines().last().unwrap().as_bytes())
        );
    }

    #[test]
    fn nothing_is_written_after_a_partial_record_until_it_is_cut_off() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, disk) = faulty(d.path(), opts(1 << 20, 0));
        w.append(rec(1)).unwrap();
        w.commit().unwrap();
        let len = fs::metadata(seg_path(d.path(), 1)).unwrap().len();
        {
            let mut f = disk.faults.lock().unwrap();
            f.space = Some(len / 2);
            f.fail_truncate = true;
        }
        w.append(rec(2)).unwrap();
        assert!(w.commit().unwrap_err().lost.is_some());
        assert!(fs::metadata(seg_path(d.path(), 1)).unwrap().len() > len);
        disk.faults.lock().unwrap().space = None;
        w.append(rec(3)).unwrap();
        let e = w.commit().unwrap_err();
        assert_eq!(e.lost.unwrap().events, 1, "not glued to the partial line");
        assert_eq!(e.source.raw_os_error(), Some(libc::EIO));
        disk.faults.lock().unwrap().fail_truncate = false;
        w.append(loss_record(&Lost {
            records: 2,
            events: 2,
            ..Default::default()
        }))
        .unwrap();
        w.append(rec(4)).unwrap();
        w.commit().unwrap();
        assert_intact(d.path(), 4);
    }

    #[test]
    fn tail_and_follow_filter_by_identity_across_segments() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 1, 60, opts(4096, 0));
        let t = tail(d.path(), 5, None).unwrap();
        assert_eq!(t.len(), 5);
        assert!(t[4].contains("\"seq\":60"), "{t:?}");
        let t = tail(d.path(), 1000, Some("spiffe://td/w1")).unwrap();
        assert_eq!(t.len(), 20);
        assert!(t
            .iter()
            .all(|l| l.contains("\"spiffe_id\":\"spiffe://td/w1\"")));
        let (t, mut f) = tail_and_follow(d.path(), 3, None).unwrap();
        assert!(t[2].contains("\"seq\":60"), "{t:?}");
        write(d.path(), 61, 2, opts(4096, 0));
        let next = f.poll().unwrap();
        assert_eq!(next.len(), 2);
        assert!(next[0].contains("\"seq\":61"), "{next:?}");
        let mut f = Follower::at_end(d.path(), Some("spiffe://td/w2")).unwrap();
        assert!(f.poll().unwrap().is_empty());
        write(d.path(), 63, 90, opts(4096, 0));
        let got = f.poll().unwrap();
        assert_eq!(got.len(), 30, "every new w2 record, across rotations");
        assert!(got[0].contains("\"seq\":65"), "{}", got[0]);
    }
}
