//! Closing is TCP-like: what a sender finished and the relay acknowledged is delivered
//! after the sender's session has gone, to a reader that is slow or has not even begun;
//! only an abort, the receiver's death or an unfinished stream of a lost session cut a
//! socket short. Connections the relay closed never reach a listener's application.

use std::io::ErrorKind;
use std::time::Duration;

use overlan_client::{Client, Error, VirtualStream};
use overlan_integration_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A recognisable pattern of `len` bytes.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8).collect()
}

/// Writes `data`, finishes, waits until the relay has every byte, then leaves at once.
async fn send_and_leave(client: Client, mut stream: VirtualStream, data: Vec<u8>) {
    stream.write_all(&data).await.expect("write");
    stream.shutdown().await.expect("finish");
    within("the relay to acknowledge every byte", stream.delivered()).await.expect("delivered");
    client.close();
}

/// Connects `a` to a fresh listener of `b`; returns (a's stream, b's stream).
async fn pair(a: &Client, b: &Client, port: u16) -> (VirtualStream, VirtualStream) {
    let listener = b.listen(port).await.unwrap();
    let out = a.connect(listener.local_addr()).await.unwrap();
    let (inn, _) = within("accept", listener.accept()).await.unwrap();
    (out, inn)
}

/// Reads to the end slowly: starts after a pause, then pauses after every 256 KiB.
/// Reports how much it had read when `left` fired (the sender's session ended).
async fn read_slowly(
    mut stream: VirtualStream,
    left: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<(Vec<u8>, usize)> {
    let mut left = Some(left);
    let mut read_when_left = None;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    tokio::time::sleep(Duration::from_millis(300)).await;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok((got, read_when_left.unwrap_or(usize::MAX)));
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(rx) = &mut left {
            if rx.try_recv().is_ok() {
                read_when_left = Some(got.len());
                left = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// `sender` writes `len` bytes on `out`, finishes and leaves while `reader` reads `inn`
/// slowly; every byte must arrive, and the sender must have left with bytes in flight.
async fn deliver_after_leaving(sender: Client, out: VirtualStream, inn: VirtualStream, len: usize) {
    let data = pattern(len);
    let (left_tx, left_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(read_slowly(inn, left_rx));
    within("the sender to finish and leave", send_and_leave(sender, out, data.clone())).await;
    let _ = left_tx.send(());
    let (got, read_when_left) = within("the slow reader", reader).await.unwrap().expect("a clean end, not an error");
    assert_eq!(got.len(), data.len(), "every byte arrives");
    assert!(got == data, "bytes changed in transit");
    assert!(
        read_when_left + (1 << 20) < len,
        "the scenario needs bytes in flight when the sender leaves: {read_when_left} of {len} read by then"
    );
}

#[tokio::test]
async fn a_finished_stream_is_delivered_after_the_sender_left() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let (out, inn) = pair(&a, &b, 7000).await;
    deliver_after_leaving(a, out, inn, 16 << 20).await;
}

#[tokio::test]
async fn a_listener_that_sends_and_leaves_reaches_a_slow_connector() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let (out, inn) = pair(&a, &b, 7001).await;
    deliver_after_leaving(b, inn, out, 16 << 20).await;
}

#[tokio::test]
async fn a_sender_that_dies_mid_stream_resets_the_reader_and_the_other_way_is_cut() {
    let relay = TestRelay::start();
    let a = join(&relay.invite()).await;
    let b = join(&relay.invite()).await;
    let (mut out, mut inn) = pair(&a, &b, 7002).await;
    out.write_all(b"partial").await.unwrap();
    // Not finished: the relay must not pass a clean end on.
    let mut buf = [0u8; 7];
    within("the partial data", inn.read_exact(&mut buf)).await.unwrap();
    a.close();
    let err = within("the reader's error", inn.read(&mut buf)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(err.to_string().contains("peer session lost"), "{err}");
    // Writing toward the gone session fails too (nobody reads there any more).
    let err = within("the writer's error", async {
        loop {
            if let Err(e) = inn.write_all(&[0u8; 65536]).await {
                return e;
            }
        }
    })
    .await;
    assert!(err.to_string().contains("peer session lost"), "{err}");
}

#[tokio::test]
async fn offers_the_relay_closed_never_reach_the_listener() {
    let relay = TestRelay::start();
    let b = join(&relay.invite()).await;
    let listener = b.listen_with_approval(7003).await.unwrap();
    // An offer whose connecting session dies while it waits in the backlog.
    let dead = join(&relay.invite()).await;
    let connecting = tokio::spawn({
        let dead = dead.clone();
        let to = listener.local_addr();
        async move { dead.connect(to).await }
    });
    let offer = within("the first offer", listener.incoming()).await.unwrap();
    let dead_vip = dead.vip();
    dead.close();
    drop(dead);
    let err = within("the abandoned connect", connecting).await.unwrap().unwrap_err();
    assert!(matches!(err, Error::SessionLost(_)), "{err}");
    // Accepting it now fails clearly instead of handing out a dead stream.
    let live = join(&relay.invite()).await;
    within("the dead VIP to go offline", async {
        while !matches!(live.connect(std::net::SocketAddrV4::new(dead_vip, 1)).await, Err(Error::Unreachable { .. })) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // The relay tells B that the offer ended before it forgets the socket; a round trip
    // on B's control stream after that has B read the news first.
    within("the dead socket to end at the relay", async {
        while relay.handle().open_sockets() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    b.ping().await.unwrap();
    let err = within("accepting a dead offer", offer.accept()).await.expect_err("a dead offer is not a connection");
    assert!(err.to_string().contains("abandoned before it was accepted"), "{err}");

    // Another offer dies in the backlog before the application looks; a later live one
    // is what the application gets.
    let doomed = join(&relay.invite()).await;
    let to = listener.local_addr();
    let doomed_connect = tokio::spawn({
        let doomed = doomed.clone();
        async move { doomed.connect(to).await }
    });
    // Give the relay a moment to offer it, so it waits in the listener's backlog when
    // its session dies (the assertions below hold either way: a connect that was never
    // offered is never offered later).
    let doomed_vip = doomed.vip();
    tokio::time::sleep(Duration::from_millis(200)).await;
    doomed.close();
    drop(doomed);
    let _ = within("the doomed connect", doomed_connect).await;
    within("the doomed VIP to go offline", async {
        while !matches!(live.connect(std::net::SocketAddrV4::new(doomed_vip, 1)).await, Err(Error::Unreachable { .. }))
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // The relay tells B that the doomed offer ended before it forgets the socket; a
    // round trip on B's control stream after that has B read the news first.
    within("the doomed socket to end at the relay", async {
        while relay.handle().open_sockets() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    b.ping().await.unwrap();
    let live_connect = tokio::spawn({
        let live = live.clone();
        async move { live.connect(to).await }
    });
    let offer = within("the live offer", listener.incoming()).await.unwrap();
    assert_eq!(
        *offer.peer_addr().ip(),
        live.vip(),
        "the dead offer was skipped (doomed {doomed_vip}, first dead {dead_vip})"
    );
    let mut inn = offer.accept().await.unwrap();
    let mut out = within("the live connect", live_connect).await.unwrap().unwrap();
    out.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    within("data on the live socket", inn.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"hi");
}
