//! Datagram sockets, like `tokio::net::UdpSocket` on the overlay: unreliable,
//! message-oriented, with a relay-stamped source on everything received. Sending to the
//! network's broadcast address or 255.255.255.255 reaches every other member bound to
//! that port; the sender does not get its own copy.

use std::net::SocketAddrV4;

use bytes::{BufMut, Bytes, BytesMut};
use overlan_shared::wire::control::ClientMessage;
use overlan_shared::wire::datagram::{DatagramHeader, HEADER_LEN};
use tokio::sync::{mpsc, Mutex};

use crate::client::Client;
use crate::error::Error;

/// One received datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The payload.
    pub payload: Bytes,
    /// The sender, as stamped by the relay.
    pub src: SocketAddrV4,
    /// The destination it was sent to (this socket, or a broadcast address).
    pub dst: SocketAddrV4,
}

/// A bound datagram socket. Dropping it releases the port.
#[derive(Debug)]
pub struct DatagramSocket {
    client: Client,
    local: SocketAddrV4,
    rx: Mutex<mpsc::Receiver<Datagram>>,
}

impl DatagramSocket {
    pub(crate) fn new(client: Client, local: SocketAddrV4, rx: mpsc::Receiver<Datagram>) -> Self {
        Self { client, local, rx: Mutex::new(rx) }
    }

    /// The bound address (VIP and port).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// The exact largest payload `send_to` accepts.
    pub fn max_payload(&self) -> usize {
        self.client.inner.max_payload()
    }

    /// Sends `payload` to `target` (a VIP, the network's broadcast address or
    /// 255.255.255.255). Waits only while the connection's send buffer is full.
    pub async fn send_to(&self, payload: &[u8], target: SocketAddrV4) -> Result<usize, Error> {
        let max = self.max_payload();
        if payload.len() > max {
            return Err(Error::MessageTooLarge { max });
        }
        let session = self.client.inner.session()?;
        let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
        buf.put_slice(&DatagramHeader { src: self.local, dst: target }.to_bytes());
        buf.put_slice(payload);
        match session.conn.send_datagram_wait(buf.freeze()).await {
            Ok(()) => Ok(payload.len()),
            Err(quinn::SendDatagramError::TooLarge) => Err(Error::MessageTooLarge { max }),
            Err(quinn::SendDatagramError::ConnectionLost(e)) => Err(Error::SessionLost(e.to_string())),
            Err(e) => Err(Error::SessionLost(e.to_string())),
        }
    }

    /// Receives the next datagram with its source and destination.
    pub async fn recv(&self) -> Result<Datagram, Error> {
        let mut rx = self.rx.lock().await;
        rx.recv().await.ok_or_else(|| Error::SessionLost("socket closed".into()))
    }

    /// Receives the next datagram into `buf`: its length and source. A payload longer
    /// than `buf` is cut to fit, as with UDP; use a buffer of [`Self::max_payload`] bytes
    /// (or [`Self::recv`]) to never lose a byte.
    pub async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddrV4), Error> {
        let d = self.recv().await?;
        let n = d.payload.len().min(buf.len());
        buf[..n].copy_from_slice(&d.payload[..n]);
        Ok((n, d.src))
    }
}

impl Drop for DatagramSocket {
    fn drop(&mut self) {
        let port = self.local.port();
        self.client.inner.datagram_ports.remove(&port);
        self.client.inner.notify(ClientMessage::Unbind { port });
    }
}
