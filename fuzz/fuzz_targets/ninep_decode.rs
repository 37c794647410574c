//! Fuzzes the 9P decoders: any byte string must decode or fail cleanly, and whatever
//! decodes must re-encode to a frame that decodes to the same message.
#![no_main]

use cpu_all::ninep::wire::{decode_request, decode_rmessage, decode_tmessage, encode_tmessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_rmessage(data);
    let _ = decode_request(data.to_vec());
    if let Ok((tag, msg)) = decode_tmessage(data) {
        let again = encode_tmessage(tag, &msg);
        assert_eq!(decode_tmessage(&again), Ok((tag, msg)));
    }
});
