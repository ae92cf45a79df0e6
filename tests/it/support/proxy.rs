//! TCP proxies on loopback: [`Proxy`], which a test can cut and restore (a member of a
//! cluster that talks to etcd through it is cut off from etcd while the others are
//! not), and [`HookProxy`], which runs a test's hook exactly before a request reaches the
//! server or exactly before its answer reaches the client.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Forwards `127.0.0.1:<new port>` to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("a bound address");
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        std::thread::spawn({
            let (cut, open) = (cut.clone(), open.clone());
            move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    if cut.load(Ordering::SeqCst) {
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
                    for s in [&client, &server] {
                        if let Ok(c) = s.try_clone() {
                            o.push(c);
                        }
                    }
                    for (mut from, mut to) in [
                        (client.try_clone(), server.try_clone()),
                        (server.try_clone(), client.try_clone()),
                    ]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                    {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        Proxy { addr, cut, open }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Where a [`HookProxy`] stops a request to run its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The request came in; nothing was forwarded yet.
    Request,
    /// The server answered; nothing was passed back yet.
    Answer,
}

/// What an armed hook is: called at each [`Stage`] of the next request; `false` drops
/// the connection there (the request is never forwarded, or the answer never passed on).
pub type Hook = Box<dyn FnMut(Stage) -> bool + Send>;

/// A proxy for a server that answers one request per connection (the fake IdP): each
/// connection's request is forwarded and the whole answer read before it is passed
/// back, so that a test can act exactly before a request reaches the server, or exactly
/// while its answer is on the way (pause or kill the client: issue #20's pause tests).
pub struct HookProxy {
    addr: SocketAddr,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl HookProxy {
    /// Forwards `127.0.0.1:<new port>` to `target`.
    pub fn start(target: SocketAddr) -> HookProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("a bound address");
        let hook: Arc<Mutex<Option<Hook>>> = Arc::default();
        std::thread::spawn({
            let hook = hook.clone();
            move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let armed = hook.lock().unwrap_or_else(|e| e.into_inner()).take();
                    std::thread::spawn(move || relay(client, target, armed));
                }
            }
        });
        HookProxy { addr, hook }
    }

    /// The proxied URL of `url` (same path, this proxy's address).
    pub fn url_for(&self, url: &str) -> String {
        let rest = url
            .strip_prefix("http://")
            .and_then(|r| r.split_once('/'))
            .map_or("", |(_, p)| p);
        format!("http://{}/{rest}", self.addr)
    }

    /// Runs `hook` on the next request (once).
    pub fn arm(&self, hook: Hook) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }
}

fn relay(mut client: TcpStream, target: SocketAddr, mut hook: Option<Hook>) {
    use std::io::{Read as _, Write as _};
    let mut at = |stage| hook.as_mut().is_none_or(|h| h(stage));
    if !at(Stage::Request) {
        let _ = client.shutdown(std::net::Shutdown::Both);
        return;
    }
    let Ok(mut server) = TcpStream::connect(target) else {
        return;
    };
    if let (Ok(mut from), Ok(mut to)) = (client.try_clone(), server.try_clone()) {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
        });
    }
    // One answer per connection: the server closes after it.
    let mut answer = Vec::new();
    let _ = server.read_to_end(&mut answer);
    if !at(Stage::Answer) {
        let _ = client.shutdown(std::net::Shutdown::Both);
        return;
    }
    let _ = client.write_all(&answer);
    let _ = client.shutdown(std::net::Shutdown::Both);
}
