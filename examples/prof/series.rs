//! A time series in bounded memory: buckets of equal width keep the largest and the
//! last value seen in them; when there are too many, neighbours merge and the width
//! doubles. Peaks survive any thinning.

const CAP: usize = 4096;

#[derive(Debug, Clone)]
pub struct Series {
    width: u64,
    /// (bucket start, max, last)
    buckets: Vec<(u64, f64, f64)>,
}

impl Series {
    pub fn new() -> Self {
        Series {
            width: 1000,
            buckets: Vec::new(),
        }
    }

    pub fn push(&mut self, t: u64, v: f64) {
        let b = t / self.width * self.width;
        match self.buckets.last_mut() {
            Some(last) if last.0 >= b => {
                last.1 = last.1.max(v);
                last.2 = v;
            }
            _ => self.buckets.push((b, v, v)),
        }
        if self.buckets.len() > CAP {
            self.width *= 2;
            let w = self.width;
            let mut out: Vec<(u64, f64, f64)> = Vec::with_capacity(CAP / 2 + 1);
            for &(s, m, l) in &self.buckets {
                let s = s / w * w;
                match out.last_mut() {
                    Some(o) if o.0 == s => {
                        o.1 = o.1.max(m);
                        o.2 = l;
                    }
                    _ => out.push((s, m, l)),
                }
            }
            self.buckets = out;
        }
    }

    /// (bucket start ns, max, last).
    pub fn points(&self) -> &[(u64, f64, f64)] {
        &self.buckets
    }

    /// The largest value in [from, to) (the last value before it where no bucket is
    /// there): for pixels wider than a bucket.
    pub fn max_in(&self, from: u64, to: u64) -> f64 {
        let w = self.width;
        let i = self.buckets.partition_point(|b| b.0 + w <= from);
        let mut m: Option<f64> = None;
        for b in &self.buckets[i..] {
            if b.0 >= to {
                break;
            }
            m = Some(m.map_or(b.1, |m| m.max(b.1)));
        }
        m.unwrap_or_else(|| if i > 0 { self.buckets[i - 1].2 } else { 0.0 })
    }
}
