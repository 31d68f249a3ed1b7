//! The one attempt loop, and the fail-over rules it follows.
//!
//! Everything that sends a request (or opens a connection) somewhere runs
//! [`run`]: the gateway's HTTP path over a service's endpoints (then over
//! its fallback), upgrades, `CONNECT` tunnels and TCP routes, and each
//! tier of the sidecar (direct, group gateways, central). The loop picks a
//! member not yet tried, attempts, and after a failure asks the rules what
//! comes next. Only failures on the upstream's side are blamed on the
//! member (ejection, outlier detection); a failure of the client's own
//! upload is never retried and never counted against an endpoint.
//!
//! The rules of DESIGN.md ("Fail-over chain"), as functions of a
//! [`Failure`]:
//! - [`after_attempt`]: within one set of members;
//! - [`next_tier`]: from one tier to the next (the sidecar's direct →
//!   group gateways → central);
//! - [`use_fallback`]: from a service to its fallback service.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::http::error::{Failure, MeshError, Side};
use crate::observe::access_log::{Trail, OK, RETRY_STATUS};
use crate::upstream::balance::Balancer;
use crate::upstream::endpoint::EndpointState;

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Nothing was sent: try another member.
    Member,
    /// The request may have been sent and may be sent again: another
    /// member (or, with nothing untried left, the same one again).
    Resend,
    /// The failure is final.
    Stop,
}

/// The rule within one set of members:
/// - the client's own fault (a malformed or abandoned upload) or the
///   mesh's own refusal (a breaker limit): stop; no other member would do
///   better;
/// - nothing was sent (a refused connect): any request moves on;
/// - the request may have been sent (a reset, a timeout, a broken
///   answer): only when `may_resend` says it may be sent again (its
///   method, its replayable body, the retry policy, budget and deadline).
pub(crate) fn after_attempt(f: &Failure, may_resend: impl FnOnce() -> bool) -> Next {
    match (f.side, f.sent) {
        (Side::Downstream | Side::Mesh, _) => Next::Stop,
        (Side::Upstream, false) => Next::Member,
        (Side::Upstream, true) if may_resend() => Next::Resend,
        (Side::Upstream, true) => Next::Stop,
    }
}

/// What a request allows once it failed somewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resend {
    /// A copy of the request can still be sent (a buffered body, or the
    /// request handed back unsent).
    pub body: bool,
    /// Its method is idempotent, or it is marked `x-mesh-retryable`.
    pub method: bool,
}

/// The rule from one tier to the next, after a tier failed or answered
/// with a mesh error: never for the client's own fault, nor without a copy
/// of the request to send; any request when nothing was sent on (no
/// endpoint, refused, no route, not ready, a breaker limit); a request
/// that may have been sent only when its method allows it. (Whether a
/// timeout left time for another tier is the caller's to know: the sidecar
/// gives each gateway member the whole request time.)
pub fn next_tier(f: &Failure, resend: Resend) -> bool {
    if f.side == Side::Downstream || !resend.body {
        return false;
    }
    !f.sent || resend.method
}

/// The rule from a service to its fallback service (one level, so chains
/// cannot loop): when none of its endpoints could take the request.
pub(crate) fn use_fallback(f: &Failure) -> bool {
    matches!(
        f.reason,
        MeshError::NoHealthyEndpoint | MeshError::UpstreamConnectFailed
    ) && !f.sent
}

/// A set of members and how to walk it.
#[derive(Debug, Clone, Copy)]
pub struct Members<'a> {
    /// For messages: what the set is (`service`, `tier`) and its name.
    pub what: &'static str,
    pub name: &'a str,
    pub balancer: &'a Balancer,
    /// The request's consistent-hash key.
    pub key: Option<u64>,
    /// Refused connects tolerated before giving up on the set.
    pub max_connects: usize,
    /// After a resend, with no untried member left, a member already
    /// tried may be picked again.
    pub revisit: bool,
    /// Give up at once when every member is ejected (a fallback is
    /// waiting), instead of trying an ejected one anyway.
    pub skip_when_none_available: bool,
}

impl<'a> Members<'a> {
    /// Every member of `balancer` (the `what` named `name`), each tried
    /// at most once.
    pub fn all(what: &'static str, name: &'a str, balancer: &'a Balancer) -> Members<'a> {
        Members {
            what,
            name,
            balancer,
            key: None,
            max_connects: usize::MAX,
            revisit: false,
            skip_when_none_available: false,
        }
    }
}

/// What one attempt came to.
#[derive(Debug)]
pub enum Step<T> {
    /// An answer to pass on.
    Done(T),
    /// An answer the retry policy names (a listed status): sent again
    /// elsewhere if a resend is allowed, else passed on.
    Retry(T),
    /// The attempt failed.
    Failed(Failure),
}

/// Why a resend is asked for.
#[derive(Debug, Clone, Copy)]
pub enum Why<'a> {
    /// A [`Step::Retry`] answer.
    Answer,
    Failed(&'a Failure),
}

/// One try on one member, and what the loop asks of the one trying.
pub trait Attempt {
    /// What a successful attempt yields (a response, a connection).
    type Answer;

    /// One try on `ep`.
    fn attempt(
        &mut self,
        ep: Arc<EndpointState>,
    ) -> impl Future<Output = Step<Self::Answer>> + Send;

    /// Whether a request that may have been sent may be sent again; takes
    /// the retry when it may. Never, unless said otherwise.
    fn may_resend(&mut self, why: Why<'_>) -> bool {
        let _ = why;
        false
    }

    /// A failure on the upstream's side, to count against `ep`.
    fn blame(&mut self, ep: &EndpointState, f: &Failure);

    /// The request's access-log trail, when the request is logged: each
    /// try is added to it.
    fn trail(&mut self) -> Option<&mut Trail> {
        None
    }
}

/// Tries members of `m` with `a` until one answers or the rules stop it.
pub async fn run<A: Attempt>(m: Members<'_>, a: &mut A) -> Result<A::Answer, Failure> {
    if m.skip_when_none_available && !m.balancer.any_available() {
        return Err(no_member(m.what, m.name));
    }
    let mut tried: Vec<Arc<EndpointState>> = Vec::new();
    let mut connects = 0usize;
    let mut resent = false;
    let mut last: Option<Failure> = None;
    loop {
        let picked = if connects >= m.max_connects {
            None
        } else {
            m.balancer.pick_keyed(&tried, m.key).or_else(|| {
                (resent && m.revisit)
                    .then(|| m.balancer.pick_keyed(&[], m.key))
                    .flatten()
            })
        };
        let Some(ep) = picked else {
            return Err(exhausted(m.what, m.name, tried.len(), last));
        };
        let began = a.trail().is_some().then(Instant::now);
        let step = a.attempt(ep.clone()).await;
        if let Some(t0) = began {
            let outcome = match &step {
                Step::Done(_) => OK,
                Step::Retry(_) => RETRY_STATUS,
                Step::Failed(f) => f.reason.code(),
            };
            if let Some(trail) = a.trail() {
                trail.push(m.what, m.name, &ep.address, outcome, t0.elapsed());
            }
        }
        let f = match step {
            Step::Done(t) => return Ok(t),
            Step::Retry(t) => {
                if !a.may_resend(Why::Answer) {
                    return Ok(t);
                }
                resent = true;
                tried.push(ep);
                continue;
            }
            Step::Failed(f) => f,
        };
        if f.side == Side::Upstream {
            a.blame(&ep, &f);
        }
        match after_attempt(&f, || a.may_resend(Why::Failed(&f))) {
            Next::Member => connects += 1,
            Next::Resend => resent = true,
            Next::Stop => return Err(f),
        }
        tried.push(ep);
        last = Some(f);
    }
}

fn no_member(what: &str, name: &str) -> Failure {
    Failure::new(
        MeshError::NoHealthyEndpoint,
        format!("{what} {name} has no endpoints"),
    )
}

/// The failure of a set with nothing left to try.
fn exhausted(what: &str, name: &str, tried: usize, last: Option<Failure>) -> Failure {
    match last {
        None => no_member(what, name),
        Some(f) if f.reason == MeshError::UpstreamConnectFailed && !f.sent => Failure::new(
            MeshError::UpstreamConnectFailed,
            format!(
                "cannot connect to {what} {name} ({tried} attempt(s)); last: {}",
                f.message
            ),
        ),
        Some(f) => f,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::upstream::endpoint::EndpointRegistry;

    fn balancer(n: usize) -> Balancer {
        let reg = EndpointRegistry::default();
        Balancer::new(
            (0..n)
                .map(|i| (reg.get(&format!("10.0.0.{i}:80")), 1, 0))
                .collect(),
        )
    }

    fn refused() -> Failure {
        Failure::new(MeshError::UpstreamConnectFailed, "refused")
    }
    fn reset() -> Failure {
        Failure::new(MeshError::UpstreamReset, "reset")
    }
    fn timeout() -> Failure {
        Failure::new(MeshError::UpstreamTimeout, "per-try timeout")
    }
    fn client_body() -> Failure {
        Failure::new(MeshError::BadRequest, "malformed chunk")
            .on(Side::Downstream)
            .sent(true)
    }

    /// A scripted attempt: each try takes the next step (after the given
    /// delay on the paused clock) and records which member it went to.
    struct Script {
        steps: Mutex<VecDeque<(Duration, Step<&'static str>)>>,
        members: Mutex<Vec<String>>,
        blamed: Mutex<Vec<(String, MeshError)>>,
        resends_asked: Mutex<usize>,
    }

    impl Script {
        fn new(steps: Vec<(u64, Step<&'static str>)>) -> Script {
            Script {
                steps: Mutex::new(
                    steps
                        .into_iter()
                        .map(|(ms, s)| (Duration::from_millis(ms), s))
                        .collect(),
                ),
                members: Mutex::default(),
                blamed: Mutex::default(),
                resends_asked: Mutex::default(),
            }
        }

        async fn go(&self, m: Members<'_>, allow: usize) -> Result<&'static str, Failure> {
            let mut run_ = Run {
                script: self,
                allow,
            };
            run(m, &mut run_).await
        }
    }

    struct Run<'a> {
        script: &'a Script,
        allow: usize,
    }

    impl Attempt for Run<'_> {
        type Answer = &'static str;

        async fn attempt(&mut self, ep: Arc<EndpointState>) -> Step<&'static str> {
            self.script.members.lock().unwrap().push(ep.address.clone());
            let next = self.script.steps.lock().unwrap().pop_front();
            let (delay, step) = next.expect("a step");
            tokio::time::sleep(delay).await;
            step
        }

        fn may_resend(&mut self, _why: Why<'_>) -> bool {
            let mut asked = self.script.resends_asked.lock().unwrap();
            *asked += 1;
            *asked <= self.allow
        }

        fn blame(&mut self, ep: &EndpointState, f: &Failure) {
            self.script
                .blamed
                .lock()
                .unwrap()
                .push((ep.address.clone(), f.reason));
        }
    }

    fn members(b: &Balancer) -> Members<'_> {
        Members {
            max_connects: 3,
            ..Members::all("service", "svc", b)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connect_moves_on_for_any_request_and_is_blamed() {
        let b = balancer(3);
        let s = Script::new(vec![(5, Step::Failed(refused())), (5, Step::Done("ok"))]);
        assert_eq!(s.go(members(&b), 0).await.unwrap(), "ok");
        let tried = s.members.lock().unwrap();
        assert_eq!(tried.len(), 2);
        assert_ne!(tried[0], tried[1], "another member");
        assert_eq!(
            *s.resends_asked.lock().unwrap(),
            0,
            "nothing was sent: no resend asked"
        );
        assert_eq!(
            s.blamed.lock().unwrap()[0].1,
            MeshError::UpstreamConnectFailed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_connects_stop_at_the_limit_with_a_summary() {
        let b = balancer(5);
        let s = Script::new((0..5).map(|_| (1, Step::Failed(refused()))).collect());
        let f = s.go(members(&b), 0).await.unwrap_err();
        assert_eq!(f.reason, MeshError::UpstreamConnectFailed);
        assert!(!f.sent);
        assert!(f.message.contains("3 attempt(s)"), "{}", f.message);
        assert_eq!(s.members.lock().unwrap().len(), 3);
        assert!(
            use_fallback(&f),
            "a service none of whose endpoints took it falls back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_after_sending_moves_on_only_when_a_resend_is_allowed() {
        let b = balancer(2);
        let s = Script::new(vec![(1, Step::Failed(reset())), (1, Step::Done("ok"))]);
        assert_eq!(s.go(members(&b), 1).await.unwrap(), "ok");
        assert_eq!(s.blamed.lock().unwrap().len(), 1);

        let s = Script::new(vec![(1, Step::Failed(reset()))]);
        let f = s.go(members(&b), 0).await.unwrap_err();
        assert_eq!(f.reason, MeshError::UpstreamReset);
        assert!(f.sent);
        assert_eq!(s.members.lock().unwrap().len(), 1, "not sent twice");
        assert!(
            !use_fallback(&f),
            "a request that may have been sent never falls back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_before_anything_was_written_moves_on_like_a_refusal() {
        let b = balancer(2);
        let unsent_reset = reset().sent(false);
        let s = Script::new(vec![(1, Step::Failed(unsent_reset)), (1, Step::Done("ok"))]);
        // No resend is allowed, and none is needed: nothing was sent.
        assert_eq!(s.go(members(&b), 0).await.unwrap(), "ok");
        assert_eq!(*s.resends_asked.lock().unwrap(), 0);
        assert_eq!(s.blamed.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_cannot_be_sent_again_stops_after_the_first_send() {
        // A streamed (non-replayable) body or a POST: the caller's resend
        // check says no, whatever failed after sending.
        let b = balancer(3);
        for f in [reset(), timeout()] {
            let s = Script::new(vec![(1, Step::Failed(f))]);
            let err = s.go(members(&b), 0).await.unwrap_err();
            assert!(err.sent);
            assert_eq!(s.members.lock().unwrap().len(), 1, "sent once");
            assert_eq!(*s.resends_asked.lock().unwrap(), 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_try_timeout_is_resent_until_the_budget_is_exhausted() {
        let b = balancer(2);
        // Budget for one resend: the second timeout is final. With one
        // member left untried, the second resend would go back to a
        // tried member (revisit) if it were allowed.
        let s = Script::new(vec![
            (1000, Step::Failed(timeout())),
            (1000, Step::Failed(timeout())),
        ]);
        let m = Members {
            revisit: true,
            ..members(&b)
        };
        let start = tokio::time::Instant::now();
        let f = s.go(m, 1).await.unwrap_err();
        assert_eq!(f.reason, MeshError::UpstreamTimeout);
        assert_eq!(start.elapsed(), Duration::from_millis(2000));
        assert_eq!(*s.resends_asked.lock().unwrap(), 2);
        assert_eq!(
            s.blamed.lock().unwrap().len(),
            2,
            "both timeouts count against endpoints"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_clients_broken_upload_is_final_and_blames_no_one() {
        let b = balancer(3);
        let s = Script::new(vec![(1, Step::Failed(client_body()))]);
        let f = s.go(members(&b), 10).await.unwrap_err();
        assert_eq!(f.side, Side::Downstream);
        assert_eq!(f.reason, MeshError::BadRequest);
        assert!(s.blamed.lock().unwrap().is_empty(), "no endpoint is blamed");
        assert_eq!(*s.resends_asked.lock().unwrap(), 0, "no retry is taken");
        assert!(!next_tier(
            &f,
            Resend {
                body: true,
                method: true
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retryable_answer_is_passed_on_when_no_resend_is_left() {
        let b = balancer(2);
        let s = Script::new(vec![(1, Step::Retry("503")), (1, Step::Retry("503 again"))]);
        assert_eq!(s.go(members(&b), 1).await.unwrap(), "503 again");
        assert_eq!(s.members.lock().unwrap().len(), 2);
        assert!(
            s.blamed.lock().unwrap().is_empty(),
            "an answer is not a failure"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_mesh_own_refusal_stops_at_once() {
        let b = balancer(3);
        let full = Failure::new(MeshError::CircuitOpen, "max_connections reached");
        let s = Script::new(vec![(1, Step::Failed(full))]);
        let f = s.go(members(&b), 10).await.unwrap_err();
        assert_eq!(f.reason, MeshError::CircuitOpen);
        assert_eq!(s.members.lock().unwrap().len(), 1);
        assert!(s.blamed.lock().unwrap().is_empty());
        // ...but a tier that refused moves the request to the next tier.
        assert!(next_tier(
            &f,
            Resend {
                body: true,
                method: false
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_or_ejected_set_fails_without_trying() {
        let empty = balancer(0);
        let s = Script::new(vec![]);
        let f = s.go(members(&empty), 0).await.unwrap_err();
        assert_eq!(f.reason, MeshError::NoHealthyEndpoint);
        assert!(use_fallback(&f));

        let b = balancer(2);
        for ep in b.endpoints() {
            ep.on_failure();
        }
        let m = Members {
            skip_when_none_available: true,
            ..members(&b)
        };
        let f = s.go(m, 0).await.unwrap_err();
        assert_eq!(f.reason, MeshError::NoHealthyEndpoint);
        assert!(s.members.lock().unwrap().is_empty());
    }

    #[test]
    fn tier_rules() {
        let any = Resend {
            body: true,
            method: false,
        };
        let idempotent = Resend {
            body: true,
            method: true,
        };
        let spent = Resend {
            body: false,
            method: true,
        };
        // Nothing sent on: any request moves to the next tier.
        assert!(next_tier(&refused(), any));
        let no_route = Failure::new(MeshError::NoRoute, "x");
        assert!(next_tier(&no_route, any));
        // Maybe sent: only an idempotent or retryable request.
        assert!(!next_tier(&reset(), any));
        assert!(next_tier(&reset(), idempotent));
        // Without a copy of the request nothing moves.
        assert!(!next_tier(&refused(), spent));
        // A timeout may have been sent on: like a reset.
        assert!(next_tier(&timeout(), idempotent));
        assert!(!next_tier(&timeout(), any));
    }

    #[test]
    fn a_mesh_error_answer_is_a_failure_that_keeps_the_answer() {
        let answer = MeshError::NoRoute.response("no route");
        let f = Failure::from_answer(answer).unwrap_err();
        assert_eq!(f.reason, MeshError::NoRoute);
        assert!(!f.sent, "no_route proves nothing was sent on");
        let resp = f.into_response(false);
        assert_eq!(resp.status(), 404);

        let timed_out = MeshError::UpstreamTimeout.response("slow");
        let f = Failure::from_answer(timed_out).unwrap_err();
        assert!(f.sent);
        let idempotent = Resend {
            body: true,
            method: true,
        };
        assert!(
            next_tier(&f, idempotent),
            "a timeout answered by the next hop"
        );

        let app = http::Response::new(crate::http::body::empty());
        assert!(
            Failure::from_answer(app).is_ok(),
            "an app's answer is no failure"
        );
    }
}
