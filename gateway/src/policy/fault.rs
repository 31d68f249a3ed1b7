//! Injected faults (`fault` on a route or backend rule): a delay before a
//! request goes on and/or an abort answered by the gateway, each for a
//! share of the eligible requests (those carrying `header`, when set).

use std::time::Duration;

use http::{HeaderMap, HeaderName, StatusCode};
use meshgate_config::model::Fault;

/// A route's or rule's faults, compiled.
#[derive(Debug, Clone)]
pub struct FaultRule {
    delay: Option<(Duration, f64)>,
    abort: Option<(Abort, f64)>,
    header: Option<HeaderName>,
}

/// An injected abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abort {
    pub status: StatusCode,
    /// The gRPC status a gRPC caller gets.
    pub grpc_status: u8,
}

/// What to do to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    pub delay: Option<Duration>,
    pub abort: Option<Abort>,
}

impl FaultRule {
    pub fn new(f: &Fault) -> FaultRule {
        FaultRule {
            delay: f
                .delay
                .as_ref()
                .map(|d| (Duration::from_millis(d.ms), d.percent.0 / 100.0)),
            abort: f.abort.as_ref().map(|a| {
                (
                    Abort {
                        status: StatusCode::from_u16(a.status)
                            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        grpc_status: a.grpc_status.unwrap_or(14),
                    },
                    a.percent.0 / 100.0,
                )
            }),
            header: f
                .header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
        }
    }

    /// Draws the faults for one request (each share drawn on its own).
    pub fn draw(&self, headers: &HeaderMap) -> Injected {
        if self
            .header
            .as_ref()
            .is_some_and(|h| !headers.contains_key(h))
        {
            return Injected::default();
        }
        let hit = |share: f64| share > 0.0 && rand::random::<f64>() < share;
        Injected {
            delay: self.delay.and_then(|(d, share)| hit(share).then_some(d)),
            abort: self.abort.and_then(|(a, share)| hit(share).then_some(a)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_config::model::{FaultAbort, FaultDelay, Percent};

    #[test]
    fn shares_and_the_header_condition() {
        let f = FaultRule::new(&Fault {
            delay: Some(FaultDelay {
                ms: 5,
                percent: Percent(100.0),
            }),
            abort: Some(FaultAbort {
                status: 418,
                grpc_status: None,
                percent: Percent(0.0),
            }),
            header: Some("x-chaos".into()),
        });
        assert_eq!(f.draw(&HeaderMap::new()), Injected::default());
        let mut h = HeaderMap::new();
        h.insert("x-chaos", "1".parse().unwrap());
        let got = f.draw(&h);
        assert_eq!(got.delay, Some(Duration::from_millis(5)));
        assert_eq!(got.abort, None);
    }
}
