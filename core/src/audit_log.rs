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

/// The one writer of a log directory (`nhid` holds its state-dir lock). Records go to a buffer
/// with [`Writer::append`] and reach the file and the head with [`Writer::commit`].
pub struct Writer {
    dir: PathBuf,
    opts: WriterOptions,
    file: Option<fs::File>,
    buf: Vec<u8>,
    segment: u64,
    size: u64,
    seq: u64,
    last_hash: String,
    first_segment: u64,
    head_dirty: bool,
}

/// The end of the chain found on disk: (segment, seq, hash).
type Tail = (u64, u64, String);

impl Writer {
    /// Opens the log in `dir` (created 0700 if missing) and resumes its chain. When the chain
    /// on disk does not end where its head says (a truncated, edited or deleted file), it never
    /// appends to it: it begins a new segment and returns why, for the caller to write as a
    /// [`crate::audit::AuditKind::ChainBreak`] record first. An incomplete last line (a crash
    /// in the middle of a write, never anchored by the head) is cut off.
    pub fn open(dir: &Path, opts: WriterOptions) -> io::Result<(Writer, Option<String>)> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let segs = segments(dir)?;
        let head = read_head(dir);
        let mut w = Writer {
            dir: dir.to_path_buf(),
            opts,
            file: None,
            buf: Vec::new(),
            segment: 1,
            size: 0,
            seq: 0,
            last_hash: GENESIS.into(),
            first_segment: segs.first().copied().unwrap_or(1),
            head_dirty: false,
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
                    w.open_segment()?;
                } else {
                    // A new log: its head (seq 0) is written at once, so records written before
                    // a crash that precedes the first head update still chain on from a head.
                    w.head_dirty = true;
                }
                w.head_dirty |= tail.as_ref().map(|t| t.1) != head.as_ref().map(|h| h.seq);
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
        self.first_segment = segs
            .first()
            .copied()
            .or(head.map(|h| h.first_segment))
            .unwrap_or(self.segment);
        self.head_dirty = true;
    }

    fn open_segment(&mut self) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(segment_name(self.segment));
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)?;
        self.size = f.metadata()?.len();
        self.file = Some(f);
        Ok(())
    }

    /// Sequence number of the last record appended.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn segment(&self) -> u64 {
        self.segment
    }

    /// Chains `rec` (its `seq` and `prev` are set here) and buffers its line; returns its seq.
    pub fn append(&mut self, mut rec: Record) -> io::Result<u64> {
        rec.seq = self.seq + 1;
        rec.prev = std::mem::take(&mut self.last_hash);
        let line = serde_json::to_vec(&rec).map_err(io::Error::other)?;
        let len = line.len() as u64 + 1;
        if self.file.is_none() || (self.size > 0 && self.size + len > self.opts.max_file_bytes) {
            self.flush_buf()?;
            if self.file.is_some() {
                self.segment += 1;
            }
            self.open_segment()?;
        }
        self.last_hash = hash_line(&line);
        self.seq = rec.seq;
        self.buf.extend_from_slice(&line);
        self.buf.push(b'\n');
        self.size += len;
        self.head_dirty = true;
        if self.opts.fsync == crate::config::Fsync::Always {
            self.flush_buf()?;
            if let Some(f) = &self.file {
                f.sync_data()?;
            }
        }
        Ok(rec.seq)
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        use std::io::Write;
        if self.buf.is_empty() {
            return Ok(());
        }
        let f = self
            .file
            .as_mut()
            .expect("a segment is open while bytes are buffered");
        f.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes what is buffered, syncs per the fsync policy, replaces the head, and removes
    /// segments beyond `max_files`.
    pub fn commit(&mut self) -> io::Result<()> {
        use crate::config::Fsync;
        self.flush_buf()?;
        if !self.head_dirty {
            return Ok(());
        }
        let sync = self.opts.fsync != Fsync::Never;
        if sync {
            if let Some(f) = &self.file {
                f.sync_data()?;
            }
        }
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
        write_atomic(
            &self.dir,
            HEAD_FILE,
            &serde_json::to_vec(&head).map_err(io::Error::other)?,
            sync,
        )?;
        // The head names the new oldest segment before the older ones go.
        for n in self.first_segment..keep_from {
            match fs::remove_file(self.dir.join(segment_name(n))) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.first_segment = keep_from;
        self.head_dirty = false;
        Ok(())
    }
}

/// Replaces `dir/name` whole: a temp file, then rename.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], sync: bool) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_data()?;
    }
    // No directory fsync: a crash may bring back the previous head, and records after the
    // head are resumed (they chain on from it), never a break.
    fs::rename(&tmp, dir.join(name))?;
    Ok(())
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
