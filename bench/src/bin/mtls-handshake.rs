//! What one mutual TLS handshake between two companions costs in CPU, without a network: the
//! companion's own client and server configs (TLS 1.3, ring, SPIFFE verification, P-256 SVIDs
//! from one CA), both sides on one thread over an in-memory pipe, so the time per handshake is
//! the CPU both companions spend on it together. Next to it, in the same run, the baseline of
//! the same exchange with no TLS (one byte over the pipe), and the bulk cost of the records:
//! 100 MiB encrypted and decrypted on that one thread.
//!
//! Run: `cargo run --release -p nhi-bench --bin mtls-handshake -- --runs 2000`

use std::time::{Duration, Instant};

use clap::Parser;
use nhi_bench::{compare, interleave_n};
use nhi_companion::edge::mtls::{client_config, server_config, server_name, Material};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2000)]
    runs: usize,
    #[arg(long, default_value_t = 50)]
    warmup: usize,
}

fn main() {
    let args = Args::parse();
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_pem = p.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(p, ca_key);
    let material = |id: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).unwrap();
        let m = Material::new("bench.example", &ca_pem);
        m.set_svid("1", &cert.pem(), &key.serialize_pem()).unwrap();
        m
    };
    let cc = client_config(&material("spiffe://bench.example/caller")).unwrap();
    let sc = server_config(&material("spiffe://bench.example/callee")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let one = |tls: bool| -> Duration {
        rt.block_on(async {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let t = Instant::now();
            if tls {
                let srv = async {
                    let mut s = tokio_rustls::TlsAcceptor::from(sc.clone())
                        .accept(b)
                        .await
                        .unwrap();
                    s.read_exact(&mut [0u8; 1]).await.unwrap();
                };
                let cli = async {
                    let mut c = tokio_rustls::TlsConnector::from(cc.clone())
                        .connect(server_name(), a)
                        .await
                        .unwrap();
                    c.write_all(b"x").await.unwrap();
                    c.flush().await.unwrap();
                    c
                };
                let (_c, ()) = tokio::join!(cli, srv);
            } else {
                let (mut a, mut b) = (a, b);
                a.write_all(b"x").await.unwrap();
                b.read_exact(&mut [0u8; 1]).await.unwrap();
            }
            t.elapsed()
        })
    };
    let runs = interleave_n(args.runs, args.warmup, 2, |i| one(i == 1));
    compare(
        "One mutual TLS 1.3 handshake, both companions on one core (CPU per handshake)",
        ("no TLS (a byte over the pipe)", &runs[0]),
        ("mutual TLS handshake + a byte", &runs[1]),
    );
    // Bulk: 100 MiB through one TLS connection, both ends on this thread.
    let (enc, plain) = rt.block_on(async {
        let chunk = vec![7u8; 64 * 1024];
        let mut out = [Duration::ZERO; 2];
        for (k, tls) in [true, false].into_iter().enumerate() {
            let (a, b) = tokio::io::duplex(256 * 1024);
            let sc = sc.clone();
            let reader = async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0usize;
                if tls {
                    let mut s = tokio_rustls::TlsAcceptor::from(sc.clone())
                        .accept(b)
                        .await
                        .unwrap();
                    loop {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return total;
                        }
                        total += n;
                    }
                } else {
                    let mut s = b;
                    loop {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return total;
                        }
                        total += n;
                    }
                }
            };
            let writer = async {
                let t;
                if tls {
                    let mut c = tokio_rustls::TlsConnector::from(cc.clone())
                        .connect(server_name(), a)
                        .await
                        .unwrap();
                    t = Instant::now();
                    for _ in 0..1600 {
                        c.write_all(&chunk).await.unwrap();
                    }
                    c.shutdown().await.unwrap();
                } else {
                    let mut c = a;
                    t = Instant::now();
                    for _ in 0..1600 {
                        c.write_all(&chunk).await.unwrap();
                    }
                    c.shutdown().await.unwrap();
                }
                t
            };
            let (total, t) = tokio::join!(reader, writer);
            assert_eq!(total, 100 << 20);
            out[k] = t.elapsed();
        }
        (out[0], out[1])
    });
    let mibs = |d: Duration| 100.0 / d.as_secs_f64();
    println!(
        "100 MiB on one thread: copied {:.0} MiB/s, encrypted + decrypted (TLS records) {:.0} MiB/s; \
         the records cost {:.1} ms of CPU per 100 MiB",
        mibs(plain),
        mibs(enc),
        (enc.saturating_sub(plain)).as_secs_f64() * 1000.0
    );
}
