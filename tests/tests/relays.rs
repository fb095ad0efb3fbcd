//! Relays (docs/scale.md, section 3), with real processes over real gRPC on 127.0.0.1: a leader
//! `weir ingest-server`, a relay `weir ingest-server --relay-to <leader>`, and Envoys of the
//! tests' own speaking the filter's protocol to the relay. What the leader counted is read from
//! its windows (`window <canary>` on its stdin).

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tonic::Code;
use weir_e2e::certs::TestCa;
use weir_e2e::hostile::{IngestProcess, CANARY};
use weir_e2e::reporter::{channel, successes, Dial, TestReporter};
use weir_e2e::tcp_proxy::TcpProxy;
use weir_e2e::WorkDir;
use weir_proto::v1::{controller_message::Kind, Version};

async fn bounded<T>(limit: Duration, body: impl Future<Output = anyhow::Result<T>>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the test did not finish within {limit:?}"),
    }
}

/// A simulated Envoy on one `Exchange` stream: hello, then numbered reports of canary
/// successes, echoing the directive generation it runs.
struct Envoy {
    reporter: TestReporter,
    node: String,
    epoch: u64,
    next: u64,
    /// The newest directive: generation and the canary's weight.
    directive: Option<(u64, u32)>,
}

impl Envoy {
    /// Opens a stream to `addr` and says hello; the directive comes first.
    async fn connect(
        addr: SocketAddr,
        dial: &Dial,
        node: &str,
        epoch: u64,
    ) -> anyhow::Result<Self> {
        let reporter = TestReporter::open(channel(addr, dial).await?)
            .await
            .map_err(|s| anyhow!("{node}: the stream was refused: {s}"))?;
        let mut envoy = Self {
            reporter,
            node: node.to_owned(),
            epoch,
            next: 1,
            directive: None,
        };
        envoy.send(0, 0).await?;
        while envoy.directive.is_none() {
            envoy.receive().await?;
        }
        Ok(envoy)
    }

    async fn send(&self, sequence: u64, requests: u64) -> anyhow::Result<()> {
        let mut report = successes(
            &self.node,
            "",
            self.epoch,
            sequence,
            CANARY,
            Version::Canary,
            requests,
        );
        report.applied_generation = self.directive.map_or(0, |(generation, _)| generation);
        self.reporter.send(report).await
    }

    /// The next message; an ack's sequence is returned.
    async fn receive(&mut self) -> anyhow::Result<Option<u64>> {
        let message = self
            .reporter
            .next()
            .await
            .map_err(|s| anyhow!("{}: the stream ended: {s}", self.node))?;
        Ok(match message.kind {
            Some(Kind::Ack(ack)) => Some(ack.sequence),
            Some(Kind::Directive(d)) => {
                let weight = d
                    .canaries
                    .iter()
                    .find(|c| c.key == CANARY)
                    .map_or(0, |c| c.canary_weight_bp);
                self.directive = Some((d.generation, weight));
                None
            }
            None => None,
        })
    }

    /// Sends the next report of `requests` and waits for its ack.
    async fn report(&mut self, requests: u64) -> anyhow::Result<()> {
        let sequence = self.next;
        self.next += 1;
        self.send(sequence, requests).await?;
        self.acked(sequence).await
    }

    /// Reads until `sequence` is acknowledged.
    async fn acked(&mut self, sequence: u64) -> anyhow::Result<()> {
        loop {
            if self.receive().await?.is_some_and(|acked| acked >= sequence) {
                return Ok(());
            }
        }
    }

    /// Reads until a directive of `generation` arrives.
    async fn directive_of(&mut self, generation: u64) -> anyhow::Result<u32> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some((g, weight)) = self.directive {
                if g == generation {
                    return Ok(weight);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no directive of generation {generation} within 15 s (has {:?})",
                    self.node,
                    self.directive
                );
            }
            self.receive().await?;
        }
    }
}

/// Waits until `process` says the directive it serves has a generation other than 0 (a relay
/// has the leader's); returns it.
async fn serving(process: &mut IngestProcess) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let generation = process.counter("weir_directive_generation").await?;
        if generation != 0 {
            return Ok(generation);
        }
        if Instant::now() > deadline {
            bail!("the relay has no directive from the leader after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the leader's canary window holds `requests`, then checks it stays there.
async fn leader_counts(leader: &mut IngestProcess, requests: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let [_, (canary, _)] = leader.window(CANARY).await?;
        if canary == requests {
            break;
        }
        if canary > requests || Instant::now() > deadline {
            bail!("the leader counted {canary} canary requests; {requests} were reported");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Three of the relay's report intervals: nothing more may arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let [_, (canary, _)] = leader.window(CANARY).await?;
    if canary != requests {
        bail!(
            "the leader counted {canary} canary requests after settling; {requests} were reported"
        );
    }
    Ok(())
}

async fn relay_in_flight(relay: &mut IngestProcess) -> anyhow::Result<u64> {
    relay.counter("weir_relay_reports_in_flight").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_through_a_relay_reach_the_leaders_windows_exactly_once_also_when_its_stream_drops_and_resends(
) {
    bounded(Duration::from_secs(120), async {
        let mut leader = IngestProcess::start(&[]).await?;
        let link = TcpProxy::start(leader.addr).await?;
        let to_leader = link.addr.to_string();
        let mut relay =
            IngestProcess::start(&["--relay-to", &to_leader, "--relay-name", "r1"]).await?;
        serving(&mut relay).await?;

        let mut envoys = Vec::new();
        for i in 0..3 {
            envoys.push(Envoy::connect(relay.addr, &Dial::Plain, &format!("envoy-{i}"), 100 + i).await?);
        }
        for envoy in &mut envoys {
            for requests in [10, 20, 30] {
                envoy.report(requests).await?;
            }
        }
        // An Envoy that lost its stream resends what it thinks unacknowledged: the relay's
        // ledger counts it once.
        {
            let mut again = Envoy::connect(relay.addr, &Dial::Plain, "envoy-0", 100).await?;
            again.send(2, 20).await?;
            again.send(3, 30).await?;
            again.acked(3).await?;
        }
        leader_counts(&mut leader, 3 * 60).await?;

        // The leader's acks to the relay are lost: the relay's reports are applied but stay
        // unacknowledged, then its stream is cut and it resends them on a new one.
        link.hold_back(true);
        for envoy in &mut envoys {
            envoy.report(100).await?;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let applied = leader.window(CANARY).await?[1].0;
        let unacked = relay_in_flight(&mut relay).await?;
        if applied != 3 * 160 || unacked == 0 {
            bail!("with acks held back, expected the leader to have applied 480 and the relay to wait for acks; the leader has {applied}, the relay {unacked} unacknowledged");
        }
        let duplicates_before = leader.counter("weir_reports_duplicate_total").await?;
        link.cut();
        let deadline = Instant::now() + Duration::from_secs(15);
        while relay_in_flight(&mut relay).await? > 1 || link.connections() < 2 {
            if Instant::now() > deadline {
                bail!("the relay did not reconnect and resend within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for envoy in &mut envoys {
            envoy.report(1).await?;
        }
        leader_counts(&mut leader, 3 * 161).await?;
        let duplicates = leader.counter("weir_reports_duplicate_total").await? - duplicates_before;
        if duplicates == 0 {
            bail!("the relay resent nothing after the cut (the leader saw no duplicate)");
        }
        // One reporter at the leader: the relay.
        let known = leader.counter("weir_reporters_known").await?;
        if known != 1 {
            bail!("the leader knows {known} reporters; only the relay reports to it");
        }
        relay.stop().await;
        leader.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directive_passes_down_to_the_envoys_on_a_relay_unchanged() {
    bounded(Duration::from_secs(60), async {
        let mut leader = IngestProcess::start(&[]).await?;
        let to_leader = leader.addr.to_string();
        let mut relay = IngestProcess::start(&["--relay-to", &to_leader]).await?;
        let first = serving(&mut relay).await?;
        let leaders = leader.counter("weir_directive_generation").await?;
        if first != leaders {
            bail!("the relay serves generation {first}, the leader {leaders}");
        }
        let mut envoy = Envoy::connect(relay.addr, &Dial::Plain, "envoy-0", 7).await?;
        if envoy.directive != Some((leaders, 1_000)) {
            bail!(
                "the Envoy on the relay got {:?}, not the leader's directive",
                envoy.directive
            );
        }
        let generation = leader.publish(2_500).await?;
        let started = Instant::now();
        let weight = envoy.directive_of(generation).await?;
        if weight != 2_500 {
            bail!("the relayed directive has weight {weight}, the leader published 2500");
        }
        eprintln!("leader → relay → Envoy: {:?}", started.elapsed());
        // A relay publishes nothing of its own.
        if relay.publish(0).await.is_ok() {
            bail!("the relay published a directive of its own");
        }
        relay.stop().await;
        leader.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_controller_replica_can_be_a_relay_and_a_relay_forwards_only_verified_identities() {
    let certs = WorkDir::new("relay_trust_certs").unwrap();
    bounded(Duration::from_secs(90), async {
        let ca = TestCa::new(certs.path())?;
        let controller = ca.controller()?;
        let (cert, key, root) = (
            controller.cert.to_string_lossy().into_owned(),
            controller.key.to_string_lossy().into_owned(),
            ca.root.to_string_lossy().into_owned(),
        );
        let tls = [
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &root,
        ];
        let mut leader = IngestProcess::start(&tls).await?;
        let dial = |pem| Dial::Tls {
            root: ca.root.clone(),
            identity: Some(pem),
        };

        // A workload of the canary's own namespace claiming to be a relay.
        let workload = ca.workload("bench", "default")?;
        let forged = TestReporter::open(channel(leader.addr, &dial(workload.clone())).await?)
            .await
            .map_err(|s| anyhow!("the stream was refused before its hello: {s}"))?;
        let mut forged = forged;
        forged
            .send(successes("relay~r1", "", 1, 0, CANARY, Version::Canary, 0))
            .await?;
        match forged.next().await {
            Err(status) if status.code() == Code::PermissionDenied => {
                eprintln!("forged relay refused: {}", status.message())
            }
            other => bail!("a workload claiming to be a relay was not refused: {other:?}"),
        }
        let refused = leader.rejected("not_a_replica").await?;
        if refused != 1 {
            bail!("not_a_replica counted {refused}, expected 1");
        }

        // A replica with the controller's own certificate is a relay.
        let to_leader = leader.addr.to_string();
        let mut args = tls.to_vec();
        args.extend(["--relay-to", &to_leader, "--relay-name", "r1"]);
        let mut relay = IngestProcess::start(&args).await?;
        serving(&mut relay).await?;
        let mut own = Envoy::connect(relay.addr, &dial(workload), "bench-envoy", 11).await?;
        own.report(10).await?;
        // A workload of another namespace: its entries for the canary are dropped at the relay.
        let intruder = ca.workload("intruder", "default")?;
        let mut other = Envoy::connect(relay.addr, &dial(intruder), "intruder-envoy", 12).await?;
        other.report(7).await?;
        // Without a certificate, the relay refuses the stream as the leader would.
        let anonymous = TestReporter::open(
            channel(
                relay.addr,
                &Dial::Tls {
                    root: ca.root.clone(),
                    identity: None,
                },
            )
            .await?,
        )
        .await;
        match anonymous {
            Err(status) if status.code() == Code::Unauthenticated => {}
            Err(status) => bail!("an anonymous stream at the relay ended with {status}"),
            Ok(_) => bail!("the relay served a stream without a certificate"),
        }
        leader_counts(&mut leader, 10).await?;
        let dropped = relay.rejected("not_allowed").await?;
        if dropped == 0 {
            bail!("the relay did not drop the intruder's entries");
        }
        relay.stop().await;
        leader.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_change_moves_only_the_relay_streams() {
    bounded(Duration::from_secs(120), async {
        let mut old = IngestProcess::start(&[]).await?;
        let address = old.addr.to_string();
        let mut relay =
            IngestProcess::start(&["--relay-to", &address, "--relay-grace", "20s"]).await?;
        serving(&mut relay).await?;
        let mut envoys = Vec::new();
        for i in 0..2 {
            envoys.push(
                Envoy::connect(relay.addr, &Dial::Plain, &format!("envoy-{i}"), 40 + i).await?,
            );
        }
        for envoy in &mut envoys {
            envoy.report(5).await?;
        }
        leader_counts(&mut old, 10).await?;
        // Everything the old leader counted is acknowledged to the relay.
        let deadline = Instant::now() + Duration::from_secs(10);
        while relay_in_flight(&mut relay).await? != 0 {
            if Instant::now() > deadline {
                bail!("the relay still waits for the old leader's acks");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let streams = relay.counter("weir_telemetry_streams_total").await?;

        old.kill().await?;
        let mut new = None;
        for _ in 0..50 {
            match IngestProcess::start_on(&address, &[]).await {
                Ok(process) => {
                    new = Some(process);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let mut new = new.with_context(|| format!("no new leader could listen on {address}"))?;
        let generation = new.counter("weir_directive_generation").await?;

        // The Envoys keep their streams to the relay: they report on, and get the new
        // leader's directive through it.
        for envoy in &mut envoys {
            envoy.report(7).await?;
            envoy.directive_of(generation).await?;
        }
        leader_counts(&mut new, 14).await?;
        let after = relay.counter("weir_telemetry_streams_total").await?;
        if after != streams {
            bail!(
                "the relay's Envoys opened {} new streams across the leader change",
                after - streams
            );
        }
        let known = new.counter("weir_reporters_known").await?;
        if known != 1 {
            bail!("the new leader knows {known} reporters; only the relay moved to it");
        }
        relay.stop().await;
        new.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_the_leader_serves_no_envoy_so_none_runs_stale_weights() {
    bounded(Duration::from_secs(60), async {
        // No leader at all: the relay refuses every stream.
        let nowhere = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut orphan = IngestProcess::start(&["--relay-to", &nowhere.to_string()]).await?;
        match Envoy::connect(orphan.addr, &Dial::Plain, "envoy-0", 1).await {
            Err(e) if format!("{e:#}").contains("no contact with the leader") => {}
            Err(e) => bail!("a relay without a leader refused with something else: {e:#}"),
            Ok(_) => bail!("a relay that never heard from a leader served an Envoy"),
        }
        if orphan.counter("weir_directive_generation").await? != 0 {
            bail!("a relay without a leader has a directive");
        }
        orphan.stop().await;

        // The leader goes away: after the grace the relay ends its Envoys' streams.
        let leader = IngestProcess::start(&[]).await?;
        let to_leader = leader.addr.to_string();
        let mut relay = IngestProcess::start(&["--relay-to", &to_leader, "--relay-grace", "2s"]).await?;
        serving(&mut relay).await?;
        let mut envoy = Envoy::connect(relay.addr, &Dial::Plain, "envoy-1", 2).await?;
        envoy.report(3).await?;
        leader.kill().await?;
        let killed = Instant::now();
        let ended = loop {
            match envoy.reporter.next().await {
                Ok(_) => {}
                Err(status) if status.code() == Code::DeadlineExceeded => {}
                Err(status) => break status,
            }
            if killed.elapsed() > Duration::from_secs(15) {
                bail!("the relay kept its Envoy's stream 15 s after losing the leader");
            }
        };
        let after = killed.elapsed();
        if ended.code() != Code::Unavailable || after < Duration::from_secs(2) {
            bail!("the Envoy's stream ended after {after:?} with {ended}; expected UNAVAILABLE after the 2 s grace");
        }
        eprintln!("stream ended {after:?} after the leader was killed: {}", ended.message());
        match Envoy::connect(relay.addr, &Dial::Plain, "envoy-1", 3).await {
            Err(e) if format!("{e:#}").contains("no contact with the leader") => {}
            Err(e) => bail!("the relay refused a new stream with something else: {e:#}"),
            Ok(_) => bail!("a relay out of contact with the leader served a new Envoy"),
        }
        relay.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_trusts_as_its_leader_only_a_replica_of_its_own_identity_with_istio_certificates() {
    let certs = WorkDir::new("relay_leader_identity_certs").unwrap();
    bounded(Duration::from_secs(90), async {
        let ca = TestCa::new(certs.path())?;
        let root = ca.root.to_string_lossy().into_owned();
        let files = |pem: &weir_e2e::certs::Pem| {
            [
                "--tls-cert".to_owned(),
                pem.cert.to_string_lossy().into_owned(),
                "--tls-key".to_owned(),
                pem.key.to_string_lossy().into_owned(),
                "--tls-client-ca".to_owned(),
                root.clone(),
            ]
        };
        // The leader's certificate names the SPIFFE id only (no DNS name), as Istio's do; the
        // relay's carries a DNS name too, only for the test's Envoys, which check one.
        let leader_cert = ca.controller_as_istio_issues_it("leader")?;
        let relay_cert = ca.controller()?;
        let leader_args = files(&leader_cert);
        let leader_args: Vec<&str> = leader_args.iter().map(String::as_str).collect();
        let mut leader = IngestProcess::start(&leader_args).await?;
        let mut relay_args = files(&relay_cert).to_vec();
        relay_args.extend(["--relay-to".to_owned(), leader.addr.to_string()]);
        let relay_args: Vec<&str> = relay_args.iter().map(String::as_str).collect();
        let mut relay = IngestProcess::start(&relay_args).await?;
        serving(&mut relay).await?;
        // Its Envoys' reports reach the leader through it.
        let workload = ca.workload("bench", "default")?;
        let dial = Dial::Tls {
            root: ca.root.clone(),
            identity: Some(workload.clone()),
        };
        let mut envoy = Envoy::connect(relay.addr, &dial, "bench-envoy", 5).await?;
        envoy.report(4).await?;
        leader_counts(&mut leader, 4).await?;
        relay.stop().await;

        // A "leader" with another identity (a workload's certificate): the relay does not
        // take its directive, so it serves no Envoy.
        let impostor_args = files(&workload);
        let impostor_args: Vec<&str> = impostor_args.iter().map(String::as_str).collect();
        let impostor = IngestProcess::start(&impostor_args).await?;
        let mut relay_args = files(&relay_cert).to_vec();
        relay_args.extend(["--relay-to".to_owned(), impostor.addr.to_string()]);
        let relay_args: Vec<&str> = relay_args.iter().map(String::as_str).collect();
        let mut fooled = IngestProcess::start(&relay_args).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let generation = fooled.counter("weir_directive_generation").await?;
        if generation != 0 {
            bail!("the relay took generation {generation} from a leader that is not a controller replica");
        }
        let hellos = leader.counter("weir_reporter_hellos_total").await?;
        if hellos == 0 {
            bail!("the real leader never heard the first relay's hello");
        }
        fooled.stop().await;
        impostor.stop().await;
        leader.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_envoy_on_a_relay_routes_by_the_leaders_weights_and_each_request_counts_once_at_the_leader(
) {
    use weir_controller::ingest::{Ingest, IngestConfig};
    use weir_e2e::stack::{
        weighted, Stack, StackOptions, CANARY as APP, CANARY_VERSION, PRIMARY_VERSION,
    };
    bounded(Duration::from_secs(120), async {
        // The leader's ingest in this process (its windows are read directly), a relay process,
        // and a real Envoy with the built filter reporting to the relay.
        let leader = Ingest::try_new(IngestConfig::default())?;
        leader.publish(vec![weighted(3_000)])?;
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = leader
            .serve("127.0.0.1:0".parse()?, async {
                let _ = stopped.await;
            })
            .await?;
        let to_leader = served.local_addr().to_string();
        let mut relay = IngestProcess::start(&["--relay-to", &to_leader]).await?;
        serving(&mut relay).await?;
        let stack = Stack::start(
            "relay_real_envoy",
            StackOptions {
                controller: Some(relay.addr),
                ..StackOptions::default()
            },
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while relay.counter("weir_telemetry_streams_total").await? == 0 {
            if Instant::now() > deadline {
                bail!("Envoy's reporter never reached the relay; Envoy log:\n{}", stack.envoy.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Give the workers the directive the reporter received.
        tokio::time::sleep(Duration::from_secs(1)).await;

        let load = stack.load(1_200).concurrency(8).run().await;
        let (canary, primary) = (
            load.count_version(CANARY_VERSION),
            load.count_version(PRIMARY_VERSION),
        );
        if canary + primary != load.sent() || load.server_errors() > 0 {
            bail!("not every request was served: {:?}", load.by_version());
        }
        let share = load.share(CANARY_VERSION);
        if !(0.25..=0.35).contains(&share) {
            bail!("the canary got {share:.3} of the requests under the leader's 30 %: {:?}", load.by_version());
        }
        // Every request reaches the leader's windows through the relay, once.
        let counted = |version| {
            leader
                .window(APP, version, Duration::from_secs(900), Instant::now())
                .map_or(0, |w| w.requests)
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while counted(Version::Canary) + counted(Version::Primary) < load.sent() {
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        if (counted(Version::Canary), counted(Version::Primary)) != (canary, primary) {
            bail!(
                "the leader counted canary {} / primary {}; the upstreams served {canary} / {primary}",
                counted(Version::Canary),
                counted(Version::Primary)
            );
        }

        // The leader moves the weight to 100 %: it reaches the Envoy through the relay.
        let generation = leader.publish(vec![weighted(10_000)])?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let probe = stack.load(50).concurrency(4).run().await;
            if probe.share(CANARY_VERSION) == 1.0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("generation {generation} (100 % canary) did not reach the Envoy through the relay: {:?}", probe.by_version());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        relay.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_analysed_and_promoted_with_its_envoy_on_a_relay_of_the_leader() {
    use weir_controller::spec::{CanaryStatus, Phase};
    use weir_e2e::local::{advance_weights, CanaryFile, LocalRun};
    bounded(Duration::from_secs(150), async {
        // Two replicas: the leader is local mode's controller (the ingest, the engine, the
        // runner), the other a relay process of it; the real Envoy with the built filter
        // reports to the relay only. The leader's port is chosen first so that the relay can
        // be pointed at it before the Envoy starts.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let leader = format!("127.0.0.1:{port}");
        let mut relay = IngestProcess::start(&["--relay-to", &leader]).await?;
        let relay_addr = relay.addr;
        let mut run = LocalRun::start_with("relay_rollout", &CanaryFile::default(), "1.0.0", |o| {
            o.telemetry_port = port;
            o.filters_report_to = Some(relay_addr);
        })
        .await?;
        serving(&mut relay).await?;
        let phase = |p: Phase| move |s: &CanaryStatus| s.phase == Some(p);
        run.step_until("the primary is initialized", Duration::from_secs(30), phase(Phase::Initialized))
            .await?;
        run.start_traffic(200);
        run.set_version("2.0.0", &[])?;
        run.step_until("the new version is promoted", Duration::from_secs(60), phase(Phase::Succeeded))
            .await?;
        let context = run.describe();
        let events = run.events();
        if advance_weights(&events) != [10, 20, 30, 40, 50] {
            bail!("the rollout did not advance step by step: {context}");
        }
        // Every advance after the first was decided on the numbers the relay forwarded.
        for message in run.messages_with("canary weight").iter().skip(1) {
            if !(message.contains("request-success-rate 100.00% (min 99%;")
                && message.contains(" from streamed"))
            {
                bail!("an advance without the streamed numbers: {message}\n{context}");
            }
        }
        // The leader knows one reporter, the relay; the relay knows the Envoy.
        let leader_reporters = run.mode().ingest().known_reporters();
        let relay_reporters = relay.counter("weir_reporters_known").await?;
        if (leader_reporters, relay_reporters) != (1, 1) {
            bail!("the leader knows {leader_reporters} reporters, the relay {relay_reporters}; expected the relay and the Envoy");
        }
        // And every request the traffic sent was counted once by the leader, through the relay.
        let (sent, counted) = run.stop_traffic_and_count().await?;
        if sent == 0 || counted != sent {
            bail!("the traffic sent {sent} requests, the leader counted {counted} through the relay\n{context}");
        }
        run.shutdown().await;
        relay.stop().await;
        Ok(())
    })
    .await;
}
