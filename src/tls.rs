//! TLS with rustls: the settings of `serve --cert/--key` and of clients'
//! `--ca`/`--insecure`, and the client's side of a tls:// connection.
//!
//! The server side lives in the connection core (`conn.rs`), so every model
//! speaks TLS without a line of its own. The clients (`send`, `chat`, their
//! stream, pipe and framed modes) each read and write from two threads on
//! cloned sockets, which a TLS session cannot be; so a tls:// client gets a
//! Unix socket pair instead, and a thread moves plaintext between its other
//! end and the TLS session on the TCP socket. Every client then works over
//! TLS unchanged, half-close included: the end of our input becomes a
//! close_notify, and the server's close_notify becomes the end of its reply.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

use crate::addr::{Host, HostPort};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What `serve` presents on tls:// listeners: the certificate chain in
/// `cert` and its private key in `key`, both PEM. TLS 1.2 and 1.3.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect())
        .map_err(|e| format!("--cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--cert {}: no PEM certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--key {}: {e} (a PEM private key)", key.display()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--cert and --key do not go together: {e}"))?;
    Ok(Arc::new(config))
}

/// Whom a client trusts: the certificates in `ca` (PEM: the server's own,
/// or the authority that signed it), or, with `insecure`, anyone.
pub fn client_config(ca: Option<&Path>, insecure: bool) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let config = match (ca, insecure) {
        (Some(ca), _) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--ca {}: {e}", ca.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "--ca {}: no usable certificate in it",
                    ca.display()
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth(),
        (None, false) => {
            return Err("a tls:// address needs --ca FILE (the server's certificate, or the authority that signed it), or --insecure to trust any server".into());
        }
    };
    Ok(Arc::new(config))
}

/// `--insecure`: any certificate is accepted, but the handshake's
/// signatures are still checked, so the session is still encrypted to
/// whoever answered.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Set once a client's TLS session failed (an untrusted certificate, an
/// alert): its application end then only sees the end of its pipe, which
/// alone would look like a reply that ended normally.
static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a client TLS session of this process failed.
pub fn failed() -> bool {
    FAILED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Starts TLS on `tcp` to `hp` and returns the plaintext end of a socket
/// pair; a thread moves bytes between the two until both sides are done.
/// (A socket pair, not a TLS stream type: the clients then treat a TLS
/// connection as any other Unix stream, half-close included.)
pub fn client(tcp: TcpStream, config: Arc<ClientConfig>, hp: &HostPort) -> io::Result<UnixStream> {
    let name = match &hp.host {
        Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        Host::Name(n) => ServerName::try_from(n.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
    };
    let session = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
    let (ours, theirs) = UnixStream::pair()?;
    // The read timeout (-w) the caller asked for belongs on its end.
    ours.set_read_timeout(tcp.read_timeout()?)?;
    tcp.set_read_timeout(None)?;
    tcp.set_nonblocking(true)?;
    theirs.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("upcase-tls".into())
        .spawn(move || {
            let mut pump = Pump {
                session,
                tcp,
                app: theirs,
            };
            // Said before the application's end closes (when `pump` is
            // dropped), so that the reason is on stderr, and the failure
            // recorded, before the application sees the end of its pipe.
            if let Err(e) = pump.run() {
                FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
                eprintln!("upcase: TLS: {e}");
            }
        })?;
    Ok(ours)
}

struct Pump {
    session: rustls::ClientConnection,
    tcp: TcpStream,
    app: UnixStream,
}

/// Plaintext not yet taken by the application, at most: past it we stop
/// decrypting, so the server feels the application's pace.
const MAX_PENDING: usize = 256 * 1024;

impl Pump {
    fn run(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending: Vec<u8> = Vec::new(); // plaintext for the app
        let mut outgoing: Vec<u8> = Vec::new(); // plaintext for the server
        let (mut app_done, mut server_done, mut tcp_eof) = (false, false, false);
        loop {
            // Records out.
            while self.session.wants_write() {
                match self.session.write_tls(&mut self.tcp) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            // Plaintext to the application.
            while !pending.is_empty() {
                match self.app.write(&pending) {
                    Ok(n) => drop(pending.drain(..n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The application is gone: nothing left to do.
                    Err(_) => return Ok(()),
                }
            }
            if server_done && pending.is_empty() {
                // The whole reply is delivered: its end is the app's EOF.
                let _ = self.app.shutdown(std::net::Shutdown::Write);
                if app_done || tcp_eof {
                    return Ok(());
                }
            }
            // Plaintext from the application, once the handshake is done
            // (a close_notify during the handshake would abort it), as
            // fast as rustls takes it.
            if !outgoing.is_empty() {
                let n = self.session.writer().write(&outgoing)?;
                outgoing.drain(..n);
                if n > 0 {
                    continue;
                }
            } else if self.can_take_input(app_done) {
                match self.app.read(&mut buf) {
                    Ok(0) => {
                        app_done = true;
                        self.session.send_close_notify();
                        continue;
                    }
                    Ok(n) => {
                        outgoing.extend_from_slice(&buf[..n]);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // Records in.
            if !tcp_eof && pending.len() < MAX_PENDING {
                match self.session.read_tls(&mut self.tcp) {
                    Ok(0) => tcp_eof = true,
                    Ok(_) => {
                        self.session
                            .process_new_packets()
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        loop {
                            match self.session.reader().read(&mut buf) {
                                Ok(0) => {
                                    server_done = true;
                                    break;
                                }
                                Ok(n) => pending.extend_from_slice(&buf[..n]),
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                                Err(e) => return Err(e),
                            }
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if tcp_eof && !server_done && pending.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed without close_notify: the reply may be cut",
                ));
            }
            self.wait(&pending, app_done, tcp_eof)?;
        }
    }

    /// Whether to read the application's next bytes now.
    fn can_take_input(&self, app_done: bool) -> bool {
        !app_done && !self.session.is_handshaking() && !self.session.wants_write()
    }

    /// Sleeps until one of the two sockets can move what is waiting.
    fn wait(&self, pending: &[u8], app_done: bool, tcp_eof: bool) -> io::Result<()> {
        let mut tcp_events = 0;
        if !tcp_eof && pending.len() < MAX_PENDING {
            tcp_events |= libc::POLLIN;
        }
        if self.session.wants_write() {
            tcp_events |= libc::POLLOUT;
        }
        let mut app_events = 0;
        if self.can_take_input(app_done) {
            app_events |= libc::POLLIN;
        }
        if !pending.is_empty() {
            app_events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.tcp.as_raw_fd(),
                events: tcp_events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.app.as_raw_fd(),
                events: app_events,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call's length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}
