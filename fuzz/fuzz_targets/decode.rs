//! Feed arbitrary bytes to the frame decoder, split at an arbitrary point:
//! it must return frames or an error, never panic, and re-encoding the frames
//! it returns must give back the bytes it consumed.
#![no_main]

use _core::transport::frame::{decode_all, Decoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (frames, err) = decode_all(data);
    let consumed: usize = frames.iter().map(|f| f.encode().len()).sum();
    assert!(consumed <= data.len());
    if err.is_none() {
        let mut re = Vec::new();
        for f in &frames {
            re.extend_from_slice(&f.encode());
        }
        assert_eq!(&re[..], &data[..consumed]);
    }
    // the same bytes in two pushes decode to the same frames
    if let Some((&cut, rest)) = data.split_first() {
        let cut = (cut as usize).min(rest.len());
        let mut d = Decoder::new();
        d.push(&rest[..cut]);
        let mut got = Vec::new();
        while let Ok(Some(f)) = d.next_frame() {
            got.push(f);
        }
        d.push(&rest[cut..]);
        while let Ok(Some(f)) = d.next_frame() {
            got.push(f);
        }
        let (whole, _) = decode_all(rest);
        assert_eq!(got, whole);
    }
});
