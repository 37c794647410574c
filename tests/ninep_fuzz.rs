//! Property tests on the 9P codec and server with a small deterministic PRNG: random and
//! mutated frames never panic the decoder, whatever decodes re-encodes to the same message,
//! and a live (read-only) server answers every mutated request and keeps serving.

mod ninep_support;

use std::fs;

use cpu_all::ninep::wire::*;
use ninep_support::*;

/// xorshift64*: deterministic, so a failure is reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn s(x: &str) -> P9String {
    x.into()
}

/// One valid example of every request.
fn samples() -> Vec<Tmessage> {
    use Tmessage::*;
    vec![
        Version(cpu_all::ninep::wire::Version { msize: 65536, version: s("9P2000.L") }),
        Auth(Tauth { afid: 1, uname: s("u"), aname: s(""), n_uname: 0 }),
        Attach(Tattach { fid: 9, afid: NOFID, uname: s("u"), aname: s(""), n_uname: 0 }),
        Flush(Tflush { oldtag: 3 }),
        Walk(Twalk { fid: 0, newfid: 1, names: vec![s("d"), s("f")] }),
        Read(Tread { fid: 1, offset: 0, count: 100 }),
        Write(Twrite { fid: 1, offset: 0, data: Payload::new(b"abc".to_vec()) }),
        Clunk(Tfid { fid: 1 }),
        Remove(Tfid { fid: 1 }),
        Statfs(Tfid { fid: 0 }),
        Lopen(Tlopen { fid: 1, flags: 0 }),
        Lcreate(Tlcreate { fid: 0, name: s("n"), flags: 0o102, mode: 0o644, gid: 0 }),
        Symlink(Tsymlink { fid: 0, name: s("l"), target: s("f"), gid: 0 }),
        Mknod(Tmknod { dfid: 0, name: s("p"), mode: 0o10644, major: 0, minor: 0, gid: 0 }),
        Rename(Trename { fid: 1, dfid: 0, name: s("g") }),
        Readlink(Tfid { fid: 1 }),
        Getattr(Tgetattr { fid: 0, request_mask: 0x7ff }),
        Setattr(Tsetattr { fid: 1, valid: 1, mode: 0o600, ..Default::default() }),
        XattrWalk(Txattrwalk { fid: 0, newfid: 2, name: s("user.x") }),
        XattrCreate(Txattrcreate { fid: 1, name: s("user.x"), size: 3, flags: 0 }),
        Readdir(Treaddir { fid: 1, offset: 0, count: 4096 }),
        Fsync(Tfsync { fid: 1, datasync: 0 }),
        Lock(Tlock { fid: 1, ty: 1, flags: 0, start: 0, length: 0, proc_id: 1, client_id: s("c") }),
        GetLock(Getlock { fid: 1, ty: 1, start: 0, length: 0, proc_id: 1, client_id: s("c") }),
        Link(Tlink { dfid: 0, fid: 1, name: s("h") }),
        Mkdir(Tmkdir { dfid: 0, name: s("m"), mode: 0o755, gid: 0 }),
        RenameAt(Trenameat { olddirfid: 0, oldname: s("f"), newdirfid: 0, newname: s("g") }),
        UnlinkAt(Tunlinkat { dirfid: 0, name: s("f"), flags: 0 }),
    ]
}

/// Flips, inserts, deletes or overwrites a few bytes; optionally keeps the size field true.
fn mutate(rng: &mut Rng, frame: &[u8], fix_size: bool) -> Vec<u8> {
    let mut f = frame.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !f.is_empty() => {
                let i = rng.below(f.len());
                f[i] ^= 1 << rng.below(8);
            }
            1 if !f.is_empty() => {
                let i = rng.below(f.len());
                f[i] = [0, 0xff, 0x7f, 0x80][rng.below(4)];
            }
            2 => {
                let i = rng.below(f.len() + 1);
                f.insert(i, rng.next() as u8);
            }
            3 if !f.is_empty() => {
                let i = rng.below(f.len());
                f.remove(i);
            }
            _ => {
                let n = rng.below(f.len() + 1);
                f.truncate(n);
            }
        }
    }
    if fix_size && f.len() >= 7 {
        let n = f.len() as u32;
        f[..4].copy_from_slice(&n.to_le_bytes());
    }
    f
}

#[test]
fn decoder_never_panics_and_round_trips() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds: Vec<Vec<u8>> = samples().iter().map(|m| encode_tmessage(7, m)).collect();
    // Every sample round-trips exactly.
    for (m, bytes) in samples().iter().zip(&seeds) {
        assert_eq!(decode_tmessage(bytes).as_ref().map(|(_, m)| m), Ok(m));
    }
    let mut decoded = 0;
    for i in 0..30_000 {
        let buf = if i % 3 == 0 {
            let n = rng.below(64);
            (0..n).map(|_| rng.next() as u8).collect()
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed, i % 2 == 0)
        };
        let _ = decode_rmessage(&buf);
        let _ = decode_header(&buf);
        if let Ok((tag, msg)) = decode_tmessage(&buf) {
            decoded += 1;
            // Re-encoding what we decoded gives a frame that decodes to the same message.
            let again = encode_tmessage(tag, &msg);
            assert_eq!(decode_tmessage(&again), Ok((tag, msg.clone())), "from {buf:?}");
        }
        if let Ok((_, Tmessage::Write(w))) = decode_request(buf.clone()) {
            assert!(w.data.len() < buf.len());
        }
    }
    assert!(decoded > 1000, "mutations too destructive: only {decoded} decoded");
}

#[test]
fn live_server_answers_every_mutated_request() {
    let dir = TempDir::new("fuzz");
    fs::create_dir(dir.join("d")).unwrap();
    fs::write(dir.join("d/f"), b"fuzz").unwrap();
    fs::write(dir.join("f"), b"fuzz").unwrap();
    // Read-only: mutated requests must not create device nodes or write anywhere.
    let mut opts = options(dir.path());
    opts.read_only = true;
    let mut h = start_attached(opts);
    let c = &mut h.client;
    c.walk(0, 1, &["f"]).unwrap();
    let seeds: Vec<Vec<u8>> = samples().iter().map(|m| encode_tmessage(7, m)).collect();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut sent = 0;
    for _ in 0..3000 {
        let seed = &seeds[rng.below(seeds.len())];
        let f = mutate(&mut rng, seed, true);
        // Keep the stream framable and the session's msize: no short frames, no Tversion.
        if f.len() < 7 || f[4] == 100 {
            continue;
        }
        c.send_raw(&f);
        let reply = c.recv_frame().expect("server closed on a framable request");
        decode_rmessage(&reply).expect("server sent an undecodable reply");
        sent += 1;
    }
    assert!(sent > 1000);
    // Still serving normally.
    c.version(65536).unwrap();
    c.attach(0, "").unwrap();
    c.walk(0, 1, &["d", "f"]).unwrap();
    c.lopen(1, O_RDONLY).unwrap();
    assert_eq!(c.read(1, 0, 10).unwrap(), b"fuzz");
    assert_eq!(fs::read(dir.join("f")).unwrap(), b"fuzz");
    h.finish().unwrap();
}
