//! Serving one companion's channel for one incarnation: the opening (`hello`, or `reattach`
//! with the right key), then calls dispatched to their lanes and answered concurrently by
//! `crate::handler`, notices (audit batches, log lines) taken, events pushed; until the
//! companion exits, the channel breaks or `nhid` says stop or release.

use futures_util::StreamExt;
use nhi_core::wire::{
    Call, ChannelRequest, ChannelResponse, FromCompanion, Init, Notice, Reply, ToCompanion,
    EVENT_ID, MAX_LINE,
};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, LinesCodec};

use super::*;
use crate::lanes::{Lane, Lanes, Refused};

/// Answers finished and waiting to be written to the channel.
const OUT_QUEUE: usize = 64;

async fn write_line(
    wr: &mut (impl AsyncWriteExt + Unpin),
    resp: &ChannelResponse,
) -> Result<(), Ended> {
    let mut out = serde_json::to_vec(resp).expect("response serializes");
    out.push(b'\n');
    let res = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await;
    // Responses may carry credentials: wipe the buffer.
    zeroize::Zeroize::zeroize(&mut out);
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ended::Exited("channel closed".into())),
        Err(_) => Err(Ended::Exited(
            "companion stopped reading its channel".into(),
        )),
    }
}

pub(super) async fn serve(
    ctx: &Arc<Ctx>,
    identity: &Arc<Identity>,
    aws_token: Option<&zeroize::Zeroizing<String>>,
    inc: &mut Incarnation,
    ready_tx: &mut Option<oneshot::Sender<()>>,
    ctl_rx: &mut oneshot::Receiver<Control>,
    events_rx: &mut mpsc::UnboundedReceiver<Event>,
) -> Ended {
    let (rd, mut wr) = inc.channel.split();
    let mut lines = FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE));
    // Requests are answered concurrently, each class in its own lane: a slow store read never
    // holds up a token, and the reader below never waits for a slot.
    let (out_tx, mut out_rx) = mpsc::channel::<ChannelResponse>(OUT_QUEUE);
    let lanes = Lanes::default();
    let mut greeted = false;
    loop {
        let res = tokio::select! {
            c = &mut *ctl_rx => {
                return match c {
                    Ok(Control::Stop(done)) => Ended::Stop(done),
                    Ok(Control::Release(done)) => Ended::Release(done),
                    // The handle was dropped without stop(): treat as stop.
                    Err(_) => Ended::Stop(oneshot::channel().0),
                };
            }
            status = inc.proc.wait() => {
                return Ended::Exited(status);
            }
            Some(event) = events_rx.recv(), if greeted => {
                let body = ToCompanion::Event(event);
                write_line(&mut wr, &ChannelResponse { id: EVENT_ID, body }).await
            }
            Some(resp) = out_rx.recv() => write_line(&mut wr, &resp).await,
            next = lines.next() => {
                let line = match next {
                    Some(Ok(line)) => line,
                    Some(Err(e)) => return Ended::Exited(format!("channel: {e}")),
                    None => return Ended::Exited("channel closed".into()),
                };
                let req = match serde_json::from_str::<ChannelRequest>(&line) {
                    Ok(req) => req,
                    Err(e) => {
                        let body = ToCompanion::Reply(Reply::Error { message: format!("bad request: {e}") });
                        if let Err(ended) = write_line(&mut wr, &ChannelResponse { id: EVENT_ID, body }).await {
                            return ended;
                        }
                        continue;
                    }
                };
                if !greeted {
                    // The first message opens the channel: `hello` from a companion this nhid
                    // started, `reattach` with the right key from one it re-adopts. Nothing
                    // else is answered before.
                    let key = match (&inc.greeting, &req.body) {
                        (Greeting::Hello(key), FromCompanion::Hello) => {
                            key.as_ref().map(|k| k.as_str().to_string())
                        }
                        (Greeting::Reattach(digest), FromCompanion::Reattach { key })
                            if crate::adopt::key_matches(digest, &key.0) =>
                        {
                            tracing::info!(spiffe_id = %identity.spiffe_id, pid = inc.proc.pid(), "companion re-adopted");
                            None
                        }
                        (Greeting::Reattach(_), FromCompanion::Reattach { .. }) => {
                            return Ended::Exited("re-adoption refused: wrong key".into());
                        }
                        _ => {
                            return Ended::Exited(
                                "the companion's first message was not the expected hello or reattach"
                                    .into(),
                            );
                        }
                    };
                    greeted = true;
                    let body = hello(ctx, identity, ready_tx, aws_token, key);
                    write_line(&mut wr, &ChannelResponse { id: req.id, body }).await
                } else {
                    match req.body {
                        FromCompanion::Hello | FromCompanion::Reattach { .. } => {
                            let body = ToCompanion::Reply(Reply::Error {
                                message: "the channel is already open".into(),
                            });
                            write_line(&mut wr, &ChannelResponse { id: req.id, body }).await
                        }
                        FromCompanion::Notice(Notice::Audit { events, dropped }) => {
                            crate::audit::ingest(&ctx.audit, &ctx.metrics, identity, events, dropped);
                            Ok(())
                        }
                        FromCompanion::Notice(Notice::Log { line }) => {
                            let mut line = line;
                            if line.len() > MAX_LOG_LINE as usize {
                                let mut end = MAX_LOG_LINE as usize;
                                while !line.is_char_boundary(end) {
                                    end -= 1;
                                }
                                line.truncate(end);
                            }
                            tracing::info!(spiffe_id = %identity.spiffe_id, "companion: {line}");
                            Ok(())
                        }
                        FromCompanion::Call(call) => dispatch(ctx, identity, &lanes, &out_tx, &mut wr, req.id, call).await,
                    }
                }
            }
        };
        if let Err(ended) = res {
            return ended;
        }
    }
}

/// Starts answering request `id` in its lane, or refuses it at once if the lane is full.
async fn dispatch(
    ctx: &Arc<Ctx>,
    identity: &Arc<Identity>,
    lanes: &Lanes,
    out: &mpsc::Sender<ChannelResponse>,
    wr: &mut (impl AsyncWriteExt + Unpin),
    id: u64,
    call: Call,
) -> Result<(), Ended> {
    let started = std::time::Instant::now();
    let ticket = match lanes.admit(Lane::of(&call)) {
        Ok(t) => t,
        Err(refused) => {
            let body = ToCompanion::Reply(busy(ctx, identity, &call, &refused, started));
            return write_line(wr, &ChannelResponse { id, body }).await;
        }
    };
    let (ctx, identity, out) = (ctx.clone(), identity.clone(), out.clone());
    tokio::spawn(async move {
        let reply = match ticket.start().await {
            Ok(permit) => {
                let answer = crate::handler::answer(&ctx, &identity, call).await;
                drop(permit);
                answer
            }
            Err(refused) => busy(&ctx, &identity, &call, &refused, started),
        };
        let body = ToCompanion::Reply(reply);
        let _ = out.send(ChannelResponse { id, body }).await;
    });
    Ok(())
}

/// A request `nhid` could not start in time: audited like any other outcome, answered `busy`.
fn busy(
    ctx: &Ctx,
    identity: &Identity,
    call: &Call,
    refused: &Refused,
    started: std::time::Instant,
) -> Reply {
    let message = refused.to_string();
    tracing::debug!(spiffe_id = %identity.spiffe_id, "{message}");
    crate::audit::credential(
        &ctx.audit,
        &ctx.metrics,
        identity,
        crate::audit::requested(call),
        None,
        nhi_core::audit::Decision::Error,
        Some(message.clone()),
        started,
    );
    Reply::Busy { message }
}

/// The companion's identity and everything it serves from, answering its `hello` (with its
/// re-adoption key) or its `reattach` (without: a restarted nhid only knows the key's digest).
fn hello(
    ctx: &Ctx,
    identity: &Identity,
    ready_tx: &mut Option<oneshot::Sender<()>>,
    aws_token: Option<&zeroize::Zeroizing<String>>,
    adopt_key: Option<String>,
) -> ToCompanion {
    if let Some(tx) = ready_tx.take() {
        let _ = tx.send(());
    }
    ToCompanion::Init(Box::new(Init {
        spiffe_id: identity.spiffe_id.to_string(),
        trust_domain: ctx.issuer.trust_domain().to_string(),
        rule: identity.rule.clone(),
        workload: identity.workload.clone(),
        bundle_pem: ctx.issuer.bundle_pem(),
        jwks: ctx.issuer.jwks(),
        bundle_spiffe: ctx.issuer.spiffe_bundle(),
        revoked: ctx.revocations.is_revoked(identity.spiffe_id.as_str()),
        policy: ctx.policy_for(identity),
        egress: ctx.config.egress,
        aws: aws_provider(ctx, identity, aws_token),
        limits: ctx.config.companion.limits,
        denied_peers: ctx.denied_peers(),
        adopt_key: adopt_key.map(nhi_core::wire::Redacted),
    }))
}

/// The AWS container-credential provider of a companion whose rule names an AWS source (its
/// token reaches containers with a `/run/nhi` directory of `nhi-runc`).
fn aws_provider(
    ctx: &Ctx,
    identity: &Identity,
    token: Option<&zeroize::Zeroizing<String>>,
) -> Option<nhi_core::wire::AwsProvider> {
    let source = ctx.config.rule(&identity.rule)?.aws_credentials.as_ref()?;
    let token = token?;
    Some(nhi_core::wire::AwsProvider {
        secret: source.secret.clone(),
        token: token.to_string(),
    })
}
