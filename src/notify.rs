//! systemd's readiness protocol (`Type=notify`): one datagram to `$NOTIFY_SOCKET`. Without
//! the variable (not under systemd) it does nothing. A few lines instead of a crate.

use std::os::unix::net::UnixDatagram;

/// Sends a state such as `READY=1` or `STOPPING=1`. Failures are logged, never fatal: the
/// daemon works the same without a supervisor listening.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket: systemd's default.
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &address)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(error) = sent {
        tracing::warn!(%error, state, "cannot notify systemd");
    }
}
