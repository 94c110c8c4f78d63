//! TLS for `loadtest run --url https://…`: the client configuration every
//! stream of a worker shares, and one connection's reads and writes through
//! rustls on a non-blocking socket.
//!
//! Certificates are checked against Mozilla's roots (compiled in, the same
//! on every machine) plus the CAs of `--ca-file`; `--insecure` takes any
//! certificate (a staging server's self-signed one) but still checks that
//! the server holds its key. The server name is the URL's host.
//!
//! A stream's plaintext goes into rustls, which holds it until the
//! handshake is done; [`send_pending`] writes what rustls has ready until
//! the socket would block, and a writable edge writes the rest. [`read`]
//! hands out plaintext, reading and decrypting more from the socket when
//! rustls has none. The HTTP publisher's blocking connections, written by
//! one thread and read by another, are split with [`split_blocking`].

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use mio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};
use serde::{Deserialize, Serialize};

/// How long a blocking connection's handshake may take.
const HANDSHAKE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the workers need to speak TLS to the server (sent to them with
/// the route).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSetup {
    /// PEM text of more CAs to trust (`--ca-file`).
    pub ca_pem: Option<String>,
    /// Any certificate is taken (`--insecure`).
    pub insecure: bool,
}

impl TlsSetup {
    /// The configuration every connection of a worker shares.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?;
        let config = if self.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Some(pem) = &self.ca_pem {
                let mut added = 0;
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert.map_err(|e| format!("--ca-file: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("--ca-file: a certificate refused: {e}"))?;
                    added += 1;
                }
                if added == 0 {
                    return Err("--ca-file: no PEM certificate in it".into());
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(Arc::new(config))
    }
}

/// A connection to `host` (`HOST[:PORT]` of the URL, a name or an address).
pub fn connection(config: &Arc<ClientConfig>, host: &str) -> Result<ClientConnection, String> {
    let name = server_name(host)?;
    ClientConnection::new(config.clone(), name).map_err(|e| format!("tls: {e}"))
}

/// The name a certificate must carry: the host without its port (an IPv6
/// address without its brackets).
fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let bare = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    ServerName::try_from(bare.to_owned()).map_err(|e| format!("tls name {bare:?}: {e}"))
}

/// Hands `plain` to rustls (which keeps it until the handshake is done)
/// and writes what is ready; returns how much of `plain` was taken.
pub fn write(tls: &mut ClientConnection, sock: &mut TcpStream, plain: &[u8]) -> io::Result<usize> {
    let n = tls.writer().write(plain)?;
    send_pending(tls, sock)?;
    Ok(n)
}

/// Writes what rustls has ready until the socket would block (Ok: the
/// writable edge sends the rest).
pub fn send_pending(tls: &mut ClientConnection, sock: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(sock) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Plaintext into `buf`: Ok(0) when the server closed, WouldBlock when
/// the socket has nothing more. Handshake messages are answered on the way.
pub fn read(tls: &mut ClientConnection, sock: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match tls.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if tls.read_tls(sock)? == 0 {
            return Ok(0);
        }
        tls.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        send_pending(tls, sock)?;
    }
}

/// A blocking TLS connection split for a writer thread and a reader
/// thread (the HTTP publisher's): the session behind a mutex that neither
/// holds while it waits on the socket, so a server that stops reading until
/// its responses are read never deadlocks them. The handshake is done here.
pub fn split_blocking(
    config: &Arc<ClientConfig>,
    host: &str,
    mut sock: std::net::TcpStream,
) -> io::Result<(TlsWriter, TlsReader)> {
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut tls = connection(config, host).map_err(invalid)?;
    // A server that never answers the handshake ends it, not the run.
    sock.set_read_timeout(Some(HANDSHAKE_LIMIT))?;
    sock.set_write_timeout(Some(HANDSHAKE_LIMIT))?;
    while tls.is_handshaking() {
        tls.complete_io(&mut sock).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {} s", HANDSHAKE_LIMIT.as_secs()),
            ),
            _ => e,
        })?;
    }
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    let tls = Arc::new(Mutex::new(tls));
    let reader = TlsReader {
        sock: sock.try_clone()?,
        tls: tls.clone(),
        raw: vec![0; 16 * 1024],
    };
    Ok((TlsWriter { sock, tls }, reader))
}

/// The writing half of [`split_blocking`]: encrypts under the lock, writes
/// after it.
pub struct TlsWriter {
    sock: std::net::TcpStream,
    tls: Arc<Mutex<ClientConnection>>,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut records = Vec::with_capacity(buf.len() + 256);
        let mut written = 0;
        {
            let mut tls = self.tls.lock().map_err(|_| io::ErrorKind::Other)?;
            while written < buf.len() {
                match tls.writer().write(&buf[written..])? {
                    0 => break,
                    n => written += n,
                }
                while tls.wants_write() {
                    tls.write_tls(&mut records)?;
                }
            }
        }
        self.sock.write_all(&records)?;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

impl TlsWriter {
    /// Ends the connection (both halves).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// The reading half of [`split_blocking`]: reads the socket without the
/// lock, decrypts under it.
pub struct TlsReader {
    sock: std::net::TcpStream,
    tls: Arc<Mutex<ClientConnection>>,
    raw: Vec<u8>,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut tls = self.tls.lock().map_err(|_| io::ErrorKind::Other)?;
                match tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            let n = self.sock.read(&mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            let mut tls = self.tls.lock().map_err(|_| io::ErrorKind::Other)?;
            let mut rest = &self.raw[..n];
            while !rest.is_empty() {
                tls.read_tls(&mut rest)?;
                tls.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
        }
    }
}

/// `--insecure`: any certificate chain is taken; the handshake's
/// signatures are still checked, so the server must hold the key of the
/// certificate it shows.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_host_without_its_port() {
        let name = |h: &str| server_name(h).map(|n| n.to_str().into_owned());
        assert_eq!(name("gw.example:443").as_deref(), Ok("gw.example"));
        assert_eq!(name("gw.example").as_deref(), Ok("gw.example"));
        assert_eq!(name("127.0.0.1:8443").as_deref(), Ok("127.0.0.1"));
        assert_eq!(name("[::1]:8443").as_deref(), Ok("::1"));
        assert!(name("bad name:1").is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let setup = TlsSetup {
            ca_pem: Some("not a certificate".into()),
            insecure: false,
        };
        assert!(setup.client_config().is_err());
        assert!(TlsSetup::default().client_config().is_ok());
        let insecure = TlsSetup {
            ca_pem: None,
            insecure: true,
        };
        assert!(insecure.client_config().is_ok());
    }
}
