//! Authorization by identity on mesh listeners: may the caller, as its
//! certificate names it, call the destination service? The service's
//! `allowed_callers` decide; a service without them follows its group's
//! `authorization` default (allow, unless the group says deny). A refusal
//! is `403 forbidden` (a gRPC call's `PERMISSION_DENIED`), the caller's
//! side of things: never retried, never carried to another tier.
//!
//! The caller is whoever the mesh verified: a sidecar by its certificate
//! (`group/<g>/service/<svc>`), or, behind a gateway (which verified it
//! and passed it on in `x-mesh-caller` and `x-mesh-source`), the identity
//! it named (or, from a gateway that sent only `x-mesh-source`, that
//! service with the group the config gives it); a gateway calling by
//! itself is `gateway/<id>`. A caller over plaintext is anonymous and
//! matches no rule. The same check runs at a gateway's mesh listener and
//! at a sidecar's inbound.
//!
//! A snapshot without any rule and without a denying group skips all of
//! this ([`Snapshot::authz_active`]): authorization costs nothing unless
//! it is used.

use http::HeaderMap;
use meshgate_config::model::Authorization;

use crate::http::error::{Failure, MeshError};
use crate::http::headers;
use crate::server::Peer;
use crate::snapshot::{ServiceRt, Snapshot};

/// A verified caller.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Caller<'a> {
    pub(crate) service: Option<&'a str>,
    pub(crate) group: Option<&'a str>,
    pub(crate) gateway: Option<&'a str>,
}

/// Who is calling, as far as the mesh verified it (`None`: anonymous).
pub(crate) fn caller<'a>(
    peer: &'a Peer,
    h: &'a HeaderMap,
    snap: &'a Snapshot,
) -> Option<Caller<'a>> {
    let id = peer.tls.as_ref()?.peer_identity.as_ref()?;
    if let Some(svc) = id.service() {
        let group = id.path().split('/').nth(1);
        return Some(Caller {
            service: Some(svc),
            group,
            gateway: None,
        });
    }
    let gateway = id.path().strip_prefix("gateway/")?;
    let vouched = h
        .get(&headers::X_MESH_CALLER)
        .and_then(|v| v.to_str().ok())
        .and_then(|uri| uri.strip_prefix("spiffe://")?.split_once('/'));
    if let Some((_, path)) = vouched {
        let mut parts = path.split('/');
        return match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("group"), g @ Some(_), Some("service"), svc @ Some(_)) => Some(Caller {
                service: svc,
                group: g,
                gateway: None,
            }),
            (Some("gateway"), gw @ Some(_), None, _) => Some(Caller {
                gateway: gw,
                ..Caller::default()
            }),
            _ => None,
        };
    }
    Some(
        match h.get(&headers::X_MESH_SOURCE).and_then(|v| v.to_str().ok()) {
            Some(svc) => Caller {
                service: Some(svc),
                group: snap.services.get(svc).and_then(|s| s.spec.group.as_deref()),
                gateway: None,
            },
            None => Caller {
                gateway: Some(gateway),
                ..Caller::default()
            },
        },
    )
}

/// Whether `rule` (an `allowed_callers` entry) admits `c`.
pub(crate) fn admits(rule: &str, c: &Caller<'_>) -> bool {
    let mut parts = rule.split('/');
    let parts = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    );
    match parts {
        (Some("*"), None, ..) => true,
        (Some(svc), None, ..) => c.service == Some(svc),
        (Some("gateway"), Some("*"), None, ..) => c.gateway.is_some(),
        (Some("gateway"), Some(id), None, ..) => c.gateway == Some(id),
        (Some("group"), Some(g), Some("service"), Some("*"), None) => {
            c.service.is_some() && c.group == Some(g)
        }
        (Some("group"), Some(g), Some("service"), Some(svc), None) => {
            c.group == Some(g) && c.service == Some(svc)
        }
        _ => false,
    }
}

/// The decision for a call of `svc` on a mesh listener.
pub(crate) fn check(
    snap: &Snapshot,
    svc: &ServiceRt,
    peer: &Peer,
    h: &HeaderMap,
) -> Result<(), Failure> {
    let caller = caller(peer, h, snap);
    let allowed = match &svc.spec.allowed_callers {
        Some(rules) => caller
            .as_ref()
            .is_some_and(|c| rules.iter().any(|r| admits(r, c))),
        None => {
            let group = svc.spec.group.as_deref().and_then(|g| snap.groups.get(g));
            group.is_none_or(|g| g.authorization == Authorization::Allow)
        }
    };
    if allowed {
        return Ok(());
    }
    let who = match &caller {
        Some(Caller {
            service: Some(s), ..
        }) => format!("service {s}"),
        Some(Caller {
            gateway: Some(g), ..
        }) => format!("gateway {g}"),
        _ => "an unauthenticated caller".to_string(),
    };
    let msg = format!("{who} may not call service {}", svc.name);
    Err(Failure::new(MeshError::Forbidden, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_admit_by_service_group_and_gateway() {
        let front = Caller {
            service: Some("front"),
            group: Some("shop"),
            gateway: None,
        };
        let gw = Caller {
            gateway: Some("gw-1"),
            ..Caller::default()
        };
        for (rule, c, want) in [
            ("*", &front, true),
            ("*", &gw, true),
            ("front", &front, true),
            ("back", &front, false),
            ("group/shop/service/front", &front, true),
            ("group/shop/service/*", &front, true),
            ("group/other/service/*", &front, false),
            ("group/other/service/front", &front, false),
            ("gateway/*", &front, false),
            ("gateway/*", &gw, true),
            ("gateway/gw-1", &gw, true),
            ("gateway/gw-2", &gw, false),
            ("front", &gw, false),
            ("group/shop/service/*", &gw, false),
        ] {
            assert_eq!(admits(rule, c), want, "{rule} for {c:?}");
        }
    }

    fn peer(id: Option<&str>) -> Peer {
        let mut p = Peer::new("127.0.0.1:1".parse().unwrap());
        p.tls = Some(std::sync::Arc::new(crate::tls::TlsInfo {
            peer_identity: id.and_then(crate::tls::SpiffeId::parse),
            ..Default::default()
        }));
        p
    }

    #[test]
    fn the_caller_is_the_certificate_or_whom_a_gateway_vouches_for() {
        let snap = Snapshot::default();
        let mut h = HeaderMap::new();
        let front = "spiffe://d/group/shop/service/front";
        // A sidecar's certificate: a header claiming otherwise is ignored.
        h.insert(
            headers::X_MESH_CALLER,
            http::HeaderValue::from_static("spiffe://d/group/x/service/y"),
        );
        let p = peer(Some(front));
        let c = caller(&p, &h, &snap).unwrap();
        assert_eq!((c.service, c.group), (Some("front"), Some("shop")));
        // A gateway vouches with x-mesh-caller (a service, or a gateway).
        let gw = peer(Some("spiffe://d/gateway/gw-1"));
        let c = caller(&gw, &h, &snap).unwrap();
        assert_eq!((c.service, c.group), (Some("y"), Some("x")));
        h.insert(
            headers::X_MESH_CALLER,
            http::HeaderValue::from_static("spiffe://d/gateway/gw-2"),
        );
        assert_eq!(caller(&gw, &h, &snap).unwrap().gateway, Some("gw-2"));
        // Something else vouched for is nobody.
        h.insert(
            headers::X_MESH_CALLER,
            http::HeaderValue::from_static("spiffe://d/other/thing"),
        );
        assert_eq!(caller(&gw, &h, &snap), None);
        // Without x-mesh-caller: its x-mesh-source, else the gateway itself.
        h.remove(&headers::X_MESH_CALLER);
        assert_eq!(caller(&gw, &h, &snap).unwrap().gateway, Some("gw-1"));
        h.insert(
            headers::X_MESH_SOURCE,
            http::HeaderValue::from_static("orders"),
        );
        assert_eq!(caller(&gw, &h, &snap).unwrap().service, Some("orders"));
        // No verified identity: anonymous.
        assert_eq!(caller(&peer(None), &h, &snap), None);
        assert_eq!(
            caller(&Peer::new("127.0.0.1:1".parse().unwrap()), &h, &snap),
            None
        );
    }
}
