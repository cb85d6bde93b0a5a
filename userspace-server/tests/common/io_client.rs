//! A client of the server I/O path as the kernel module speaks it: HELLO with a session
//! token, then reads and writes at an epoch.

use std::net::SocketAddr;
use std::time::Duration;

use sanblk_proto::map::VolumeMap;
use sanblk_proto::protocol::Attachment;
use sanblk_uapi::frame::{Op, ReplyHeader, RequestHeader, REPLY_HEADER_LEN, REQUEST_HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{TestServer, MIB};

/// A minimal server-path client (what the kmod's TCP path does).
pub struct IoClient {
    stream: TcpStream,
}

impl IoClient {
    pub async fn session(server: &TestServer, attached: &Attachment) -> IoClient {
        let text = std::fs::read_to_string(server.metadata_dir.join("io.addr"))
            .unwrap_or_else(|e| panic!("io.addr: {e}"));
        let address: SocketAddr = text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("io.addr: {e}"));
        let stream = TcpStream::connect(address)
            .await
            .unwrap_or_else(|e| panic!("io connect: {e}"));
        // As the module's socket: a request goes out in two writes (header, payload), which
        // Nagle would hold for the server's delayed ACK.
        stream
            .set_nodelay(true)
            .unwrap_or_else(|e| panic!("io nodelay: {e}"));
        let mut client = IoClient { stream };
        let token = hex::decode(&attached.session_token).unwrap_or_else(|e| panic!("{e}"));
        let hello = RequestHeader::hello(0, 0, token.len() as u32);
        assert_eq!(client.call(&hello, &token).await, 0, "hello refused");
        client
    }

    /// [`call`](Self::call), `None` if the connection fails (the server died).
    pub async fn try_call(&mut self, header: &RequestHeader, payload: &[u8]) -> Option<i32> {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        header.encode(&mut raw);
        self.stream.write_all(&raw).await.ok()?;
        self.stream.write_all(payload).await.ok()?;
        let mut raw = [0u8; REPLY_HEADER_LEN];
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut raw))
            .await
            .ok()?
            .ok()?;
        let reply = ReplyHeader::decode(&raw).ok()?;
        let mut data = vec![0u8; reply.length as usize];
        self.stream.read_exact(&mut data).await.ok()?;
        Some(reply.status)
    }

    pub async fn call(&mut self, header: &RequestHeader, payload: &[u8]) -> i32 {
        self.call_for_data(header, payload).await.0
    }

    /// Reads `length` bytes at `offset`; panics on an error status.
    pub async fn read(&mut self, map: &VolumeMap, offset: u64, length: u32) -> Vec<u8> {
        let header = RequestHeader {
            op: Op::Read,
            flags: 0,
            handle: offset + 7,
            volume_id: map.volume_id,
            epoch: map.epoch,
            offset,
            length,
        };
        let (status, data) = self.call_for_data(&header, &[]).await;
        assert_eq!(status, 0, "read at {offset}");
        data
    }

    pub async fn call_for_data(
        &mut self,
        header: &RequestHeader,
        payload: &[u8],
    ) -> (i32, Vec<u8>) {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        header.encode(&mut raw);
        self.stream
            .write_all(&raw)
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        self.stream
            .write_all(payload)
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        let mut raw = [0u8; REPLY_HEADER_LEN];
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut raw))
            .await
            .unwrap_or_else(|_| panic!("no reply to {header:?}"))
            .unwrap_or_else(|e| panic!("reply: {e}"));
        let reply = ReplyHeader::decode(&raw).unwrap_or_else(|e| panic!("{}", e.message()));
        let mut data = vec![0u8; reply.length as usize];
        self.stream
            .read_exact(&mut data)
            .await
            .unwrap_or_else(|e| panic!("reply data: {e}"));
        assert_eq!(reply.handle, header.handle);
        (reply.status, data)
    }

    /// Writes `data` at `offset` in 1 MiB frames; panics on any error status.
    pub async fn write(&mut self, map: &VolumeMap, offset: u64, data: &[u8]) {
        for (index, chunk) in data.chunks(MIB as usize).enumerate() {
            let at = offset + index as u64 * MIB;
            let header = RequestHeader {
                op: Op::Write,
                flags: 0,
                handle: at + 1,
                volume_id: map.volume_id,
                epoch: map.epoch,
                offset: at,
                length: chunk.len() as u32,
            };
            assert_eq!(self.call(&header, chunk).await, 0, "write at {at}");
        }
    }
}
