//! Property tests of every codec: round-trip error bounds, stochastic
//! rounding's expectation, top-k's choice, error feedback's conservation of
//! the gradient sum, and decoding of hostile bytes.

use proptest::prelude::*;

use super::*;

fn round_trip(codec: Codec, values: &[f32], group: usize, seed: u64) -> Vec<f32> {
    let mut bytes = Vec::new();
    encode(codec, values, group, seed, &mut bytes);
    let mut back = vec![0.0; values.len()];
    decode_into(codec.kind(), "values", &bytes, group, &mut back).expect("own encoding decodes");
    back
}

/// Finite values spread over many magnitudes, signs and exact zeros.
fn values(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    let one = prop_oneof![
        1 => Just(0.0f32),
        8 => (-1.0f32..1.0, -30i32..30).prop_map(|(m, e)| m * 2f32.powi(e)),
    ];
    proptest::collection::vec(one, 0..max_len)
}

fn lossy_codec() -> impl Strategy<Value = Codec> {
    prop_oneof![
        Just(Codec::F16),
        Just(Codec::Bf16),
        any::<bool>().prop_map(|stochastic| Codec::Int8 { stochastic }),
        (0.01f32..=1.0).prop_map(|ratio| Codec::TopK { ratio }),
    ]
}

fn kind() -> impl Strategy<Value = CodecKind> {
    prop_oneof![
        Just(CodecKind::F32),
        Just(CodecKind::F16),
        Just(CodecKind::Bf16),
        Just(CodecKind::Int8),
        Just(CodecKind::TopK),
    ]
}

proptest! {
    #[test]
    fn f32_is_exact(v in values(300)) {
        prop_assert_eq!(round_trip(Codec::F32, &v, 1, 0), v);
    }

    /// fp16 keeps 11 significant bits: relative error at most 2^-11 in the
    /// normal range, absolute error at most half the subnormal spacing
    /// (2^-25) below it; beyond +-65504 it saturates.
    #[test]
    fn fp16_relative_error(v in values(300), big in -1.0e6f32..1.0e6) {
        let mut v = v;
        v.push(big);
        for (x, d) in v.iter().zip(round_trip(Codec::F16, &v, 1, 0)) {
            let err = (d - x).abs();
            if x.abs() > 65504.0 {
                prop_assert_eq!(d, 65504.0f32.copysign(*x));
            } else if x.abs() >= 6.103_515_6e-5 {
                prop_assert!(err <= x.abs() * 2f32.powi(-11), "{x} -> {d}");
            } else {
                prop_assert!(err <= 2f32.powi(-25), "{x} -> {d}");
            }
        }
    }

    /// bf16 keeps 8 significant bits and f32's exponent range.
    #[test]
    fn bf16_relative_error(v in values(300), big in -1.0e38f32..1.0e38) {
        let mut v = v;
        v.push(big);
        for (x, d) in v.iter().zip(round_trip(Codec::Bf16, &v, 1, 0)) {
            prop_assert!((d - x).abs() <= x.abs() * 2f32.powi(-8), "{x} -> {d}");
        }
    }

    /// Rounding to nearest: every value within half a step (`scale / 2`) of
    /// its group's scale, `max |x| / 127`; the largest is exact up to rounding.
    #[test]
    fn int8_error_is_at_most_half_a_step(v in values(400), group in 1usize..100) {
        let back = round_trip(Codec::Int8 { stochastic: false }, &v, group, 0);
        for (xs, ds) in v.chunks(group).zip(back.chunks(group)) {
            let scale = xs.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, d) in xs.iter().zip(ds) {
                let err = (d - x).abs();
                // Half a step, up to the rounding of x / scale (a few ulps of 127).
                prop_assert!(err <= scale * (0.5 + 1e-4) + f32::MIN_POSITIVE, "{x} -> {d}, scale {scale}");
            }
        }
    }

    /// Stochastic rounding never strays more than one step, and is the same
    /// for the same seed.
    #[test]
    fn int8_stochastic_is_within_one_step_and_seeded(v in values(200), seed in any::<u64>()) {
        let codec = Codec::Int8 { stochastic: true };
        let back = round_trip(codec, &v, v.len().max(1), seed);
        prop_assert_eq!(&back, &round_trip(codec, &v, v.len().max(1), seed));
        let scale = v.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
        for (x, d) in v.iter().zip(&back) {
            prop_assert!((d - x).abs() <= scale * (1.0 + 1e-4) + f32::MIN_POSITIVE, "{x} -> {d}");
        }
    }

    /// Top-k keeps exactly `ceil(ratio * n)` values, as they were, and none
    /// of those dropped is larger in magnitude than one kept.
    #[test]
    fn top_k_keeps_exactly_the_k_largest(v in values(300), ratio in 0.001f32..=1.0) {
        let codec = Codec::TopK { ratio };
        let mut bytes = Vec::new();
        encode(codec, &v, 1, 0, &mut bytes);
        let k = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        prop_assert_eq!(k, top_k_count(ratio, v.len()));
        prop_assert_eq!(bytes.len(), 4 + 8 * k);
        let kept: Vec<usize> =
            bytes[4..4 + 4 * k].chunks(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize).collect();
        let back = round_trip(codec, &v, 1, 0);
        let mut smallest_kept = f32::INFINITY;
        let mut largest_dropped = 0.0f32;
        for (i, (x, d)) in v.iter().zip(&back).enumerate() {
            if kept.contains(&i) {
                prop_assert_eq!(d, x);
                smallest_kept = smallest_kept.min(x.abs());
            } else {
                prop_assert_eq!(*d, 0.0);
                largest_dropped = largest_dropped.max(x.abs());
            }
        }
        prop_assert!(largest_dropped <= smallest_kept, "dropped {largest_dropped} > kept {smallest_kept}");
    }

    /// Error feedback conserves the gradient: after any sequence of steps,
    /// what was sent plus the residual equals the sum of the gradients.
    #[test]
    fn error_feedback_conserves_the_sum(
        codec in lossy_codec(),
        len in 1usize..120,
        steps in proptest::collection::vec(values(120), 1..12),
        group in 1usize..50,
    ) {
        let mut residual = vec![0.0f32; len];
        let (mut sent, mut input) = (vec![0.0f64; len], vec![0.0f64; len]);
        let mut magnitude = vec![0.0f64; len];
        for (t, step) in steps.iter().enumerate() {
            let g: Vec<f32> = (0..len).map(|i| step.get(i).copied().unwrap_or(0.0)).collect();
            let mut out = Vec::new();
            encode_with_feedback(codec, &g, &mut residual, group, t as u64, &mut out).unwrap();
            let mut d = vec![0.0f32; len];
            decode_into(codec.kind(), "sent", &out, group, &mut d).unwrap();
            for i in 0..len {
                sent[i] += f64::from(d[i]);
                input[i] += f64::from(g[i]);
                magnitude[i] += f64::from(g[i].abs()) + f64::from(d[i].abs());
            }
        }
        for i in 0..len {
            let total = sent[i] + f64::from(residual[i]);
            let tol = 1e-6 * magnitude[i] * steps.len() as f64 + 1e-30;
            prop_assert!((total - input[i]).abs() <= tol, "element {i}: {total} vs {}", input[i]);
        }
    }

    /// Bytes from the network: any kind, any expected length, any bytes.
    /// Decoding never panics; it succeeds only for a well-formed length, and
    /// a failure writes nothing.
    #[test]
    fn hostile_bytes_never_panic(
        kind in kind(),
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        n in 0usize..100,
        group in 0usize..20,
    ) {
        let mut out = vec![7.0f32; n];
        let allocated = decode(kind, "hostile", &bytes, n, group);
        let result = decode_into(kind, "hostile", &bytes, group, &mut out);
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(
            allocated.as_ref().ok().map(bits),
            result.as_ref().ok().map(|_| bits(&out)),
            "decode and decode_into agree"
        );
        match result {
            Ok(()) => {
                let g = group.max(1);
                let expected = match kind {
                    CodecKind::F32 => 4 * n,
                    CodecKind::F16 | CodecKind::Bf16 => 2 * n,
                    CodecKind::Int8 => n + 4 * n.div_ceil(g),
                    CodecKind::TopK => bytes.len(),
                };
                prop_assert_eq!(bytes.len(), expected);
            }
            Err(e) => {
                prop_assert!(out.iter().all(|&v| v == 7.0), "a failed decode wrote: {e}");
            }
        }
    }
}

/// Stochastic rounding is unbiased: the mean of many encodings (different
/// seeds) of the same values is the values, within five standard errors
/// (the variance of one rounding is at most scale^2 / 4).
#[test]
fn int8_stochastic_is_unbiased() {
    let v: Vec<f32> = (0..64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.3).collect();
    let scale = v.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
    let draws = 4000;
    let mut mean = vec![0.0f64; v.len()];
    for seed in 0..draws {
        for (m, d) in mean.iter_mut().zip(round_trip(Codec::Int8 { stochastic: true }, &v, 64, seed)) {
            *m += f64::from(d) / draws as f64;
        }
    }
    let tol = 5.0 * f64::from(scale) / 2.0 / (draws as f64).sqrt();
    for (x, m) in v.iter().zip(&mean) {
        assert!((m - f64::from(*x)).abs() <= tol, "{x}: mean {m}, tolerance {tol}");
    }
    // Rounding to nearest is biased on the same values (so the test can tell).
    let nearest = round_trip(Codec::Int8 { stochastic: false }, &v, 64, 0);
    let biased =
        v.iter().zip(&nearest).filter(|(x, d)| (f64::from(**d) - f64::from(**x)).abs() > tol).count();
    assert!(biased > 10, "only {biased} of 64 values are rounded further than the tolerance");
}

fn decode_err(kind: CodecKind, bytes: &[u8], n: usize, group: usize) -> String {
    let mut out = vec![0.0; n];
    decode_into(kind, "grads", bytes, group, &mut out).expect_err("must be refused").to_string()
}

fn le(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[test]
fn malformed_encodings_are_refused_by_name() {
    // Lengths that disagree with the expected value count.
    assert_eq!(decode_err(CodecKind::F16, &[0; 5], 3, 1), "grads (fp16): 5 bytes, expected 6 for 3 values");
    assert!(decode_err(CodecKind::Int8, &[0; 9], 4, 4).contains("expected 8"));
    assert!(decode_err(CodecKind::TopK, &[1, 0], 4, 1).contains("no count"));
    // A count larger than the block, or than the bytes.
    assert!(decode_err(CodecKind::TopK, &le(&[5]), 4, 1).contains("5 values sent of a block of 4"));
    assert!(decode_err(CodecKind::TopK, &le(&[u32::MAX]), 4, 1).contains("of a block of 4"));
    assert!(decode_err(CodecKind::TopK, &le(&[2, 0]), 4, 1).contains("expected 20"));
    // Indices out of range, repeated, or out of order.
    let one = 1.0f32.to_bits();
    assert!(decode_err(CodecKind::TopK, &le(&[1, 4, one]), 4, 1).contains("index 4"));
    assert!(decode_err(CodecKind::TopK, &le(&[2, 1, 1, one, one]), 4, 1).contains("index 1"));
    assert!(decode_err(CodecKind::TopK, &le(&[2, 2, 1, one, one]), 4, 1).contains("index 1"));
    // Scales that are not finite and non-negative.
    for scale in [f32::NAN, f32::INFINITY, -1.0] {
        let mut bytes = scale.to_le_bytes().to_vec();
        bytes.extend([1, 2]);
        assert!(decode_err(CodecKind::Int8, &bytes, 2, 2).contains("scale"), "{scale}");
    }
}

#[test]
fn codecs_read_from_toml_and_validate() {
    #[derive(serde::Deserialize)]
    struct T {
        c: Codec,
    }
    let read = |s: &str| toml::from_str::<T>(s).map(|t| t.c);
    assert_eq!(read("c = { codec = \"fp16\" }").unwrap(), Codec::F16);
    assert_eq!(read("c = { codec = \"bf16\" }").unwrap(), Codec::Bf16);
    assert_eq!(read("c = { codec = \"int8\" }").unwrap(), Codec::Int8 { stochastic: false });
    assert_eq!(
        read("c = { codec = \"int8\", stochastic = true }").unwrap(),
        Codec::Int8 { stochastic: true }
    );
    assert_eq!(read("c = { codec = \"top_k\", ratio = 0.1 }").unwrap(), Codec::TopK { ratio: 0.1 });
    assert!(read("c = { codec = \"int4\" }").is_err());
    assert!(read("c = { codec = \"top_k\" }").is_err(), "top_k needs its ratio");
    assert!(read("c = { codec = \"fp16\", ratio = 0.5 }").is_err(), "unknown keys are errors");
    assert!(read("c = { codec = \"top_k\", ratio = 0.0 }").is_err());
    assert!(read("c = { codec = \"int8\", stochastic = true, extra = 1 }").is_err());
    for c in [Codec::F32, Codec::F16, Codec::Int8 { stochastic: true }, Codec::TopK { ratio: 0.25 }] {
        #[derive(serde::Serialize)]
        struct W {
            c: Codec,
        }
        assert_eq!(read(&toml::to_string(&W { c }).unwrap()).unwrap(), c, "written and read back");
    }
    assert!(Codec::TopK { ratio: 0.0 }.validate().is_err());
    // The command line's short form.
    assert_eq!("int8:stochastic".parse::<Codec>().unwrap(), Codec::Int8 { stochastic: true });
    assert_eq!("top_k:0.01".parse::<Codec>().unwrap(), Codec::TopK { ratio: 0.01 });
    assert_eq!("bf16".parse::<Codec>().unwrap(), Codec::Bf16);
    for bad in ["int4", "top_k", "top_k:x", "top_k:2", "fp16:stochastic"] {
        assert!(bad.parse::<Codec>().is_err(), "{bad}");
    }
    assert!(Codec::TopK { ratio: 1.5 }.validate().is_err());
    let pulls_in_int8 = Codecs { push: Codec::F32, pull: Codec::Int8 { stochastic: false } };
    assert!(pulls_in_int8.validate().is_err());
    assert!(Codecs { push: Codec::TopK { ratio: 0.1 }, pull: Codec::Bf16 }.validate().is_ok());
}

#[test]
fn codec_fingerprints_tell_pushes_apart() {
    use CodecKind::*;
    assert_eq!(codecs_tag([]), 0);
    assert_eq!(codecs_tag([F32, F32]), 0, "all f32 is 0, as in a push from before codecs");
    let tags = [
        codecs_tag([Int8]),
        codecs_tag([F16]),
        codecs_tag([Bf16]),
        codecs_tag([TopK]),
        codecs_tag([Int8, F32]),
        codecs_tag([F32, Int8]),
        codecs_tag([Int8, Int8]),
    ];
    for (i, a) in tags.iter().enumerate() {
        assert_ne!(*a, 0);
        for b in &tags[i + 1..] {
            assert_ne!(a, b, "{tags:?}");
        }
    }
}
