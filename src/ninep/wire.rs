//! The 9P2000.L wire format: one [`WireFormat`] trait for every wire type, the T- and
//! R-message enums, and framing helpers. Pure codec: no I/O, no filesystem.
//!
//! Every length read from the wire is checked against the bytes that are actually left in
//! the frame before anything is allocated, so a hostile peer cannot make us allocate more
//! than the frame it sent (and frames are capped by the negotiated msize).

use std::fmt;
use std::ops::{Deref, Range};

/// Size of the frame header: size[4] type[1] tag[2].
pub const HEADER_LEN: usize = 7;
/// Header of Rread/Rreaddir: frame header plus count[4].
pub const IO_HEADER_LEN: usize = 11;
/// Most names one Twalk may carry (Plan 9 MAXWELEM).
pub const MAX_WALK_ELEMENTS: usize = 16;
/// The tag of Tversion.
pub const NOTAG: u16 = 0xffff;
/// "No fid" (Tattach afid).
pub const NOFID: u32 = 0xffff_ffff;

/// Message type numbers (Linux include/net/9p/9p.h).
pub mod msg_type {
    pub const RLERROR: u8 = 7;
    pub const RREAD: u8 = 117;
    pub const RREADDIR: u8 = 41;
}

/// QID type bits.
pub const QTDIR: u8 = 0x80;
pub const QTSYMLINK: u8 = 0x02;
pub const QTFILE: u8 = 0x00;

/// Why a buffer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The message ended before a field did.
    Truncated,
    /// A message type this codec does not know (or not a T-message / R-message).
    UnknownType(u8),
    /// The frame's size field disagrees with the buffer or is out of bounds.
    BadSize(u32),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => write!(f, "truncated message"),
            WireError::UnknownType(t) => write!(f, "unknown message type {t}"),
            WireError::BadSize(s) => write!(f, "bad message size {s}"),
        }
    }
}

impl std::error::Error for WireError {}

/// A cursor over a received frame. Reads never go past the end.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Offset of the next byte in the underlying buffer.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Takes exactly `n` bytes, or fails without consuming anything.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.remaining() {
            return Err(WireError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

/// One encode/decode pair for every type that crosses the wire.
pub trait WireFormat: Sized {
    /// Appends the little-endian wire form of `self`.
    fn encode(&self, w: &mut Vec<u8>);
    /// Reads one value; fails (never panics) on short or inconsistent input.
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError>;
}

macro_rules! wire_int {
    ($($t:ty),*) => {$(
        impl WireFormat for $t {
            fn encode(&self, w: &mut Vec<u8>) {
                w.extend_from_slice(&self.to_le_bytes());
            }
            fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
                Ok(<$t>::from_le_bytes(r.array()?))
            }
        }
    )*};
}
wire_int!(u8, u16, u32, u64);

/// A 9P string: length[2] then bytes. Kept as raw bytes because Linux file names need not
/// be UTF-8.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct P9String(pub Vec<u8>);

impl P9String {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for P9String {
    fn from(s: &str) -> Self {
        P9String(s.as_bytes().to_vec())
    }
}

impl From<&[u8]> for P9String {
    fn from(s: &[u8]) -> Self {
        P9String(s.to_vec())
    }
}

impl fmt::Debug for P9String {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl WireFormat for P9String {
    fn encode(&self, w: &mut Vec<u8>) {
        // Longer strings cannot be represented; truncating keeps the frame well formed.
        let n = self.0.len().min(u16::MAX as usize);
        (n as u16).encode(w);
        w.extend_from_slice(&self.0[..n]);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let n = u16::decode(r)? as usize;
        Ok(P9String(r.take(n)?.to_vec()))
    }
}

/// A counted list: count[2] then elements. The count is checked against the bytes left
/// (every element takes at least one byte) before anything is reserved.
impl<T: WireFormat> WireFormat for Vec<T> {
    fn encode(&self, w: &mut Vec<u8>) {
        let n = self.len().min(u16::MAX as usize);
        (n as u16).encode(w);
        for e in &self[..n] {
            e.encode(w);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let n = u16::decode(r)? as usize;
        if n > r.remaining() {
            return Err(WireError::Truncated);
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(T::decode(r)?);
        }
        Ok(v)
    }
}

/// Bulk data: count[4] then bytes. Received payloads may borrow the frame they came in
/// (no copy of a 1 MiB Twrite); decoded generically they own a copy.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Payload {
    buf: Vec<u8>,
    range: Range<usize>,
}

impl Payload {
    /// A payload that owns `data`.
    pub fn new(data: Vec<u8>) -> Self {
        let range = 0..data.len();
        Payload { buf: data, range }
    }

    /// A payload that is the `range` part of `frame`; `range` must lie inside `frame`.
    fn from_frame(frame: Vec<u8>, range: Range<usize>) -> Self {
        debug_assert!(range.end <= frame.len());
        Payload { buf: frame, range }
    }

    /// Gives back the underlying buffer (for reuse).
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.len())
    }
}

impl WireFormat for Payload {
    fn encode(&self, w: &mut Vec<u8>) {
        (self.len() as u32).encode(w);
        w.extend_from_slice(self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let n = u32::decode(r)? as usize;
        Ok(Payload::new(r.take(n)?.to_vec()))
    }
}

/// The server's unique identity for a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Qid {
    pub ty: u8,
    pub version: u32,
    pub path: u64,
}

impl WireFormat for Qid {
    fn encode(&self, w: &mut Vec<u8>) {
        self.ty.encode(w);
        self.version.encode(w);
        self.path.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Qid { ty: u8::decode(r)?, version: u32::decode(r)?, path: u64::decode(r)? })
    }
}

/// Declares a struct whose wire form is its fields in order.
macro_rules! wire_struct {
    ($($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $field:ident : $ty:ty),* $(,)? })*) => {$(
        $(#[$m])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct $name { $($(#[$fm])* pub $field: $ty),* }

        impl WireFormat for $name {
            #[allow(unused_variables)]
            fn encode(&self, w: &mut Vec<u8>) {
                $(self.$field.encode(w);)*
            }
            #[allow(unused_variables)]
            fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
                Ok($name { $($field: WireFormat::decode(r)?),* })
            }
        }
    )*};
}

wire_struct! {
    /// Tversion / Rversion.
    pub struct Version { pub msize: u32, pub version: P9String }
    pub struct Tauth { pub afid: u32, pub uname: P9String, pub aname: P9String, pub n_uname: u32 }
    pub struct Tattach {
        pub fid: u32, pub afid: u32, pub uname: P9String, pub aname: P9String, pub n_uname: u32,
    }
    pub struct Tflush { pub oldtag: u16 }
    pub struct Twalk { pub fid: u32, pub newfid: u32, pub names: Vec<P9String> }
    pub struct Tread { pub fid: u32, pub offset: u64, pub count: u32 }
    pub struct Twrite { pub fid: u32, pub offset: u64, pub data: Payload }
    /// Tclunk, Tremove, Tstatfs, Treadlink: just a fid.
    pub struct Tfid { pub fid: u32 }
    pub struct Tlopen { pub fid: u32, pub flags: u32 }
    pub struct Tlcreate { pub fid: u32, pub name: P9String, pub flags: u32, pub mode: u32, pub gid: u32 }
    pub struct Tsymlink { pub fid: u32, pub name: P9String, pub target: P9String, pub gid: u32 }
    pub struct Tmknod {
        pub dfid: u32, pub name: P9String, pub mode: u32, pub major: u32, pub minor: u32, pub gid: u32,
    }
    pub struct Trename { pub fid: u32, pub dfid: u32, pub name: P9String }
    pub struct Tgetattr { pub fid: u32, pub request_mask: u64 }
    pub struct Tsetattr {
        pub fid: u32, pub valid: u32, pub mode: u32, pub uid: u32, pub gid: u32, pub size: u64,
        pub atime_sec: u64, pub atime_nsec: u64, pub mtime_sec: u64, pub mtime_nsec: u64,
    }
    pub struct Txattrwalk { pub fid: u32, pub newfid: u32, pub name: P9String }
    pub struct Txattrcreate { pub fid: u32, pub name: P9String, pub size: u64, pub flags: u32 }
    pub struct Treaddir { pub fid: u32, pub offset: u64, pub count: u32 }
    pub struct Tlock {
        pub fid: u32, pub ty: u8, pub flags: u32, pub start: u64, pub length: u64,
        pub proc_id: u32, pub client_id: P9String,
    }
    /// Tgetlock (Rgetlock is the same without the fid).
    pub struct Getlock {
        pub fid: u32, pub ty: u8, pub start: u64, pub length: u64, pub proc_id: u32,
        pub client_id: P9String,
    }
    pub struct Rgetlock {
        pub ty: u8, pub start: u64, pub length: u64, pub proc_id: u32, pub client_id: P9String,
    }
    pub struct Tlink { pub dfid: u32, pub fid: u32, pub name: P9String }
    pub struct Tmkdir { pub dfid: u32, pub name: P9String, pub mode: u32, pub gid: u32 }
    pub struct Trenameat { pub olddirfid: u32, pub oldname: P9String, pub newdirfid: u32, pub newname: P9String }
    pub struct Tunlinkat { pub dirfid: u32, pub name: P9String, pub flags: u32 }

    pub struct Rlerror { pub ecode: u32 }
    pub struct Rqid { pub qid: Qid }
    pub struct Rwalk { pub qids: Vec<Qid> }
    pub struct Rread { pub data: Payload }
    pub struct Rwrite { pub count: u32 }
    pub struct Rstatfs {
        pub ty: u32, pub bsize: u32, pub blocks: u64, pub bfree: u64, pub bavail: u64,
        pub files: u64, pub ffree: u64, pub fsid: u64, pub namelen: u32,
    }
    /// Rlopen / Rlcreate.
    pub struct Ropen { pub qid: Qid, pub iounit: u32 }
    pub struct Rreadlink { pub target: P9String }
    pub struct Rgetattr {
        pub valid: u64, pub qid: Qid, pub mode: u32, pub uid: u32, pub gid: u32, pub nlink: u64,
        pub rdev: u64, pub size: u64, pub blksize: u64, pub blocks: u64,
        pub atime_sec: u64, pub atime_nsec: u64, pub mtime_sec: u64, pub mtime_nsec: u64,
        pub ctime_sec: u64, pub ctime_nsec: u64, pub btime_sec: u64, pub btime_nsec: u64,
        pub gen: u64, pub data_version: u64,
    }
    pub struct Rxattrwalk { pub size: u64 }
    pub struct Rreaddir { pub data: Payload }
    pub struct Rlock { pub status: u8 }
    pub struct Empty {}
    /// One entry inside Rreaddir's data.
    pub struct Dirent { pub qid: Qid, pub offset: u64, pub ty: u8, pub name: P9String }
}

/// Tfsync: fid[4] datasync[4]; old kernels sent no datasync field, so it is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tfsync {
    pub fid: u32,
    pub datasync: u32,
}

impl WireFormat for Tfsync {
    fn encode(&self, w: &mut Vec<u8>) {
        self.fid.encode(w);
        self.datasync.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let fid = u32::decode(r)?;
        let datasync = if r.remaining() >= 4 { u32::decode(r)? } else { 0 };
        Ok(Tfsync { fid, datasync })
    }
}

/// Declares a message enum with its type numbers and a codec for the body.
macro_rules! messages {
    ($(#[$m:meta])* pub enum $name:ident { $($variant:ident($ty:ty) = $code:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $name { $($variant($ty)),* }

        impl $name {
            /// The message type byte.
            pub fn type_byte(&self) -> u8 {
                match self { $($name::$variant(_) => $code),* }
            }

            /// Encodes the body (without the frame header).
            pub fn encode_body(&self, w: &mut Vec<u8>) {
                match self { $($name::$variant(m) => m.encode(w)),* }
            }

            /// Decodes the body of a message of type `ty`.
            pub fn decode_body(ty: u8, r: &mut Reader<'_>) -> Result<Self, WireError> {
                match ty {
                    $($code => Ok($name::$variant(<$ty>::decode(r)?)),)*
                    other => Err(WireError::UnknownType(other)),
                }
            }
        }
    };
}

messages! {
    /// Every request of 9P2000.L.
    pub enum Tmessage {
        Statfs(Tfid) = 8,
        Lopen(Tlopen) = 12,
        Lcreate(Tlcreate) = 14,
        Symlink(Tsymlink) = 16,
        Mknod(Tmknod) = 18,
        Rename(Trename) = 20,
        Readlink(Tfid) = 22,
        Getattr(Tgetattr) = 24,
        Setattr(Tsetattr) = 26,
        XattrWalk(Txattrwalk) = 30,
        XattrCreate(Txattrcreate) = 32,
        Readdir(Treaddir) = 40,
        Fsync(Tfsync) = 50,
        Lock(Tlock) = 52,
        GetLock(Getlock) = 54,
        Link(Tlink) = 70,
        Mkdir(Tmkdir) = 72,
        RenameAt(Trenameat) = 74,
        UnlinkAt(Tunlinkat) = 76,
        Version(Version) = 100,
        Auth(Tauth) = 102,
        Attach(Tattach) = 104,
        Flush(Tflush) = 108,
        Walk(Twalk) = 110,
        Read(Tread) = 116,
        Write(Twrite) = 118,
        Clunk(Tfid) = 120,
        Remove(Tfid) = 122,
    }
}

messages! {
    /// Every reply of 9P2000.L.
    pub enum Rmessage {
        Lerror(Rlerror) = 7,
        Statfs(Rstatfs) = 9,
        Lopen(Ropen) = 13,
        Lcreate(Ropen) = 15,
        Symlink(Rqid) = 17,
        Mknod(Rqid) = 19,
        Rename(Empty) = 21,
        Readlink(Rreadlink) = 23,
        Getattr(Rgetattr) = 25,
        Setattr(Empty) = 27,
        XattrWalk(Rxattrwalk) = 31,
        XattrCreate(Empty) = 33,
        Readdir(Rreaddir) = 41,
        Fsync(Empty) = 51,
        Lock(Rlock) = 53,
        GetLock(Rgetlock) = 55,
        Link(Empty) = 71,
        Mkdir(Rqid) = 73,
        RenameAt(Empty) = 75,
        UnlinkAt(Empty) = 77,
        Version(Version) = 101,
        Auth(Rqid) = 103,
        Attach(Rqid) = 105,
        Flush(Empty) = 109,
        Walk(Rwalk) = 111,
        Read(Rread) = 117,
        Write(Rwrite) = 119,
        Clunk(Empty) = 121,
        Remove(Empty) = 123,
    }
}

/// Encodes a complete frame (size, type, tag, body).
pub fn encode_frame(w: &mut Vec<u8>, ty: u8, tag: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = w.len();
    w.extend_from_slice(&[0, 0, 0, 0]);
    w.push(ty);
    tag.encode(w);
    body(w);
    let size = (w.len() - start) as u32;
    w[start..start + 4].copy_from_slice(&size.to_le_bytes());
}

/// Encodes a T-message frame (what a client sends).
pub fn encode_tmessage(tag: u16, msg: &Tmessage) -> Vec<u8> {
    let mut w = Vec::new();
    encode_frame(&mut w, msg.type_byte(), tag, |w| msg.encode_body(w));
    w
}

/// Encodes an R-message frame (what the server sends).
pub fn encode_rmessage(w: &mut Vec<u8>, tag: u16, msg: &Rmessage) {
    encode_frame(w, msg.type_byte(), tag, |w| msg.encode_body(w));
}

/// Reads size, type and tag from the start of a frame.
pub fn decode_header(frame: &[u8]) -> Result<(u32, u8, u16), WireError> {
    let mut r = Reader::new(frame);
    let size = u32::decode(&mut r)?;
    let ty = u8::decode(&mut r)?;
    let tag = u16::decode(&mut r)?;
    Ok((size, ty, tag))
}

/// Checks the header of a complete frame and returns its type, tag and body.
fn split_frame(frame: &[u8]) -> Result<(u8, u16, &[u8]), WireError> {
    let (size, ty, tag) = decode_header(frame)?;
    if size as usize != frame.len() {
        return Err(WireError::BadSize(size));
    }
    Ok((ty, tag, &frame[HEADER_LEN..]))
}

/// Decodes a complete T-message frame (borrowed; payloads are copied).
pub fn decode_tmessage(frame: &[u8]) -> Result<(u16, Tmessage), WireError> {
    let (ty, tag, body) = split_frame(frame)?;
    Ok((tag, Tmessage::decode_body(ty, &mut Reader::new(body))?))
}

/// Decodes a complete T-message frame that the server owns. A Twrite's payload keeps
/// pointing into `frame` instead of being copied.
pub fn decode_request(frame: Vec<u8>) -> Result<(u16, Tmessage), (Option<u16>, WireError)> {
    let (ty, tag, _) = split_frame(&frame).map_err(|e| {
        let tag = decode_header(&frame).ok().map(|(_, _, tag)| tag);
        (tag, e)
    })?;
    if ty == 118 {
        let mut r = Reader::new(&frame[HEADER_LEN..]);
        let head = (|| Ok((u32::decode(&mut r)?, u64::decode(&mut r)?, u32::decode(&mut r)?)))();
        let (fid, offset, count) = head.map_err(|e| (Some(tag), e))?;
        let start = HEADER_LEN + r.position();
        if count as usize > r.remaining() {
            return Err((Some(tag), WireError::Truncated));
        }
        let range = start..start + count as usize;
        let data = Payload::from_frame(frame, range);
        return Ok((tag, Tmessage::Write(Twrite { fid, offset, data })));
    }
    let mut r = Reader::new(&frame[HEADER_LEN..]);
    Tmessage::decode_body(ty, &mut r).map(|m| (tag, m)).map_err(|e| (Some(tag), e))
}

/// Decodes a complete R-message frame (what a client receives).
pub fn decode_rmessage(frame: &[u8]) -> Result<(u16, Rmessage), WireError> {
    let (ty, tag, body) = split_frame(frame)?;
    Ok((tag, Rmessage::decode_body(ty, &mut Reader::new(body))?))
}

/// Bytes one directory entry takes in Rreaddir data.
pub fn dirent_size(name_len: usize) -> usize {
    13 + 8 + 1 + 2 + name_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tversion_bytes() {
        let msg = Tmessage::Version(Version { msize: 8192, version: "9P2000.L".into() });
        let bytes = encode_tmessage(NOTAG, &msg);
        let mut want = vec![21, 0, 0, 0, 100, 0xff, 0xff, 0, 0x20, 0, 0, 8, 0];
        want.extend_from_slice(b"9P2000.L");
        assert_eq!(bytes, want);
        assert_eq!(decode_tmessage(&bytes), Ok((NOTAG, msg)));
    }

    #[test]
    fn rgetlock_has_no_fid() {
        // Linux reads Rgetlock as type[1] start[8] length[8] proc_id[4] client_id[s]; a fid
        // there made every F_GETLK that reached the server fail with EFAULT.
        let r = Rmessage::GetLock(Rgetlock { ty: 1, start: 2, length: 3, proc_id: 4, client_id: "c".into() });
        let mut w = Vec::new();
        encode_rmessage(&mut w, 7, &r);
        let mut want = vec![31, 0, 0, 0, 55, 7, 0, 1];
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(&4u32.to_le_bytes());
        want.extend_from_slice(&[1, 0, b'c']);
        assert_eq!(w, want);
    }

    #[test]
    fn twrite_borrows_frame() {
        let msg = Tmessage::Write(Twrite { fid: 3, offset: 9, data: Payload::new(b"hello".to_vec()) });
        let bytes = encode_tmessage(5, &msg);
        let (tag, got) = decode_request(bytes).map_err(|(_, e)| e).unwrap();
        assert_eq!(tag, 5);
        match got {
            Tmessage::Write(w) => {
                assert_eq!((w.fid, w.offset, &w.data[..]), (3, 9, &b"hello"[..]));
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn lengths_are_capped_by_the_frame() {
        // Twalk claiming 65535 names in a tiny frame.
        let mut frame = Vec::new();
        encode_frame(&mut frame, 110, 1, |w| {
            1u32.encode(w);
            2u32.encode(w);
            0xffffu16.encode(w);
        });
        assert_eq!(decode_request(frame), Err((Some(1), WireError::Truncated)));
        // Twrite claiming 4 GiB.
        let mut frame = Vec::new();
        encode_frame(&mut frame, 118, 2, |w| {
            1u32.encode(w);
            0u64.encode(w);
            u32::MAX.encode(w);
        });
        assert_eq!(decode_request(frame), Err((Some(2), WireError::Truncated)));
    }

    #[test]
    fn every_reply_round_trips() {
        let replies = vec![
            Rmessage::Lerror(Rlerror { ecode: 2 }),
            Rmessage::Walk(Rwalk { qids: vec![Qid { ty: QTDIR, version: 1, path: 7 }] }),
            Rmessage::Read(Rread { data: Payload::new(vec![1, 2, 3]) }),
            Rmessage::Getattr(Rgetattr { valid: 0x7ff, size: 42, ..Default::default() }),
            Rmessage::GetLock(Rgetlock { ty: 2, client_id: "x".into(), ..Default::default() }),
            Rmessage::Flush(Empty {}),
        ];
        for r in replies {
            let mut w = Vec::new();
            encode_rmessage(&mut w, 9, &r);
            assert_eq!(decode_rmessage(&w), Ok((9, r)));
        }
    }
}
