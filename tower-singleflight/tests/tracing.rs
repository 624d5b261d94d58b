//! With the `tracing` feature, each follower's span links (follows-from) to the leader's
//! flight span.
#![cfg(feature = "tracing")]

mod support;

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use http::{Request, Response};
use support::{full, get, until};
use tokio::sync::watch;
use tower::{service_fn, Layer, ServiceExt};
use tower_singleflight::SingleflightLayer;
use tracing::{span, Instrument, Subscriber};
use tracing_subscriber::{layer::Context, prelude::*, registry::LookupSpan};

/// Records `(follower span name, followed span name)` pairs.
#[derive(Clone, Default)]
struct Links(Arc<Mutex<Vec<(String, String)>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Links {
    fn on_follows_from(&self, span: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        let name = |id| {
            ctx.span(id)
                .map(|s| s.name().to_owned())
                .unwrap_or_default()
        };
        self.0.lock().unwrap().push((name(span), name(follows)));
    }
}

#[tokio::test]
async fn followers_spans_follow_from_the_leaders_flight_span() {
    let links = Links::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(links.clone()));
    let (open, gate) = watch::channel(false);
    let inner = service_fn(move |_req: Request<()>| {
        let mut gate = gate.clone();
        async move {
            gate.wait_for(|o| *o).await.unwrap();
            Ok::<_, Infallible>(Response::new(full("x")))
        }
    });
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let leader = tokio::spawn(
        svc.clone()
            .oneshot(get("/t"))
            .instrument(tracing::info_span!("leader_request")),
    );
    until(|| stats.leaders() == 1).await;
    let follower = tokio::spawn(
        svc.clone()
            .oneshot(get("/t"))
            .instrument(tracing::info_span!("follower_request")),
    );
    until(|| stats.followers() == 1).await;
    open.send(true).unwrap();
    leader.await.unwrap().unwrap();
    follower.await.unwrap().unwrap();
    let links = links.0.lock().unwrap().clone();
    assert_eq!(
        links,
        vec![(
            "follower_request".to_owned(),
            "singleflight.flight".to_owned()
        )]
    );
}
