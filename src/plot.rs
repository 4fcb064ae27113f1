//! Line and dot charts as SVG, drawn with plotters' SVG backend. Text goes
//! into the SVG as `<text>` elements that the viewer renders, so no font
//! files are needed (plotters is built without its `ttf` feature and only
//! estimates text sizes for layout).
//!
//! A [`Chart`] is plain data (title, subtitle, axis labels, series); the y
//! axis may be log10; the x axis is numeric or a list of categories (point x
//! = category index). The legend sits to the right of the plot area. Used by
//! [`crate::sweep`] for its reports.

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, DefaultFormatting, KeyPointHint, Ranged, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// (x, y); non-finite points (and y <= 0 on a log axis) are skipped.
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at every point (for sparse data).
    pub markers: bool,
    /// Join the points with a line (off for histograms with gaps).
    pub lines: bool,
}

impl Series {
    /// A line, with or without dots.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>, markers: bool) -> Series {
        Series { name: name.into(), points, markers, lines: true }
    }

    /// Dots only.
    pub fn dots(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.into(), points, markers: true, lines: false }
    }
}

#[derive(Debug, Clone)]
pub enum XAxis {
    Numeric,
    /// Category `i` sits at x = i.
    Categories(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    /// A smaller second line under the title.
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub x: XAxis,
    pub log_y: bool,
    /// Start the y axis at zero (linear axes only).
    pub y_from_zero: bool,
    pub series: Vec<Series>,
}

/// Matplotlib's "tab10": distinct, readable on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

const SIZE: (u32, u32) = (860, 480);
/// Height of the title and subtitle band.
const HEADER: u32 = 56;
/// Width of the legend column right of the plot area.
const LEGEND: u32 = 190;
const FONT: &str = "sans-serif";
const SUBTITLE: RGBColor = RGBColor(0x44, 0x44, 0x44);
const NO_DATA: RGBColor = RGBColor(0x88, 0x88, 0x88);
const GRID_LIGHT: RGBColor = RGBColor(0xf4, 0xf4, 0xf4);
const GRID_BOLD: RGBColor = RGBColor(0xdd, 0xdd, 0xdd);

impl Chart {
    pub fn new(title: impl Into<String>, x_label: impl Into<String>, y_label: impl Into<String>) -> Chart {
        Chart {
            title: title.into(),
            subtitle: String::new(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            x: XAxis::Numeric,
            log_y: false,
            y_from_zero: false,
            series: Vec::new(),
        }
    }

    fn visible(&self, (x, y): (f64, f64)) -> bool {
        x.is_finite() && y.is_finite() && (!self.log_y || y > 0.0)
    }

    /// The chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let mut svg = String::new();
        if let Err(e) = self.draw(SVGBackend::with_string(&mut svg, SIZE).into_drawing_area()) {
            // Drawing into a string only fails on a bug in the layout; an
            // unreadable chart must not end a sweep.
            tracing::warn!(title = %self.title, error = %e, "chart not drawn");
        }
        svg
    }

    /// Draws the header, then picks the coordinates this chart needs
    /// (numeric or categories; linear or log) and draws the plot.
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<(), DrawError<DB>> {
        root.fill(&WHITE)?;
        let (header, body) = root.split_vertically(HEADER);
        let center = SIZE.0 as i32 / 2 - LEGEND as i32 / 2;
        let title = TextStyle::from((FONT, 20).into_font().style(FontStyle::Bold));
        header.draw(&Text::new(
            self.title.clone(),
            (center, 8),
            title.pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
        if !self.subtitle.is_empty() {
            let sub = TextStyle::from((FONT, 15).into_font()).color(&SUBTITLE);
            header.draw(&Text::new(
                self.subtitle.clone(),
                (center, 34),
                sub.pos(Pos::new(HPos::Center, VPos::Top)),
            ))?;
        }
        let points: Vec<(f64, f64)> =
            self.series.iter().flat_map(|s| s.points.iter().copied()).filter(|&p| self.visible(p)).collect();
        match &self.x {
            XAxis::Categories(cats) => {
                // One tick, labelled, under every category.
                self.draw_with_x(&body, CategoryAxis(cats.len().max(1)), &points)?
            }
            XAxis::Numeric => {
                let (lo, hi) = pad(span(points.iter().map(|p| p.0)).map(|(lo, hi)| (lo.min(0.0), hi)));
                self.draw_with_x(&body, lo..hi, &points)?
            }
        }
        root.present()
    }

    fn draw_with_x<DB, X>(
        &self,
        body: &DrawingArea<DB, Shift>,
        x: X,
        points: &[(f64, f64)],
    ) -> Result<(), DrawError<DB>>
    where
        DB: DrawingBackend,
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
    {
        let y_span = span(points.iter().map(|p| p.1));
        if self.log_y {
            // Whole decades, so the axis starts and ends on a labelled power
            // of ten (widened by a hair: 10^-3 computed is not quite 0.001).
            let (lo, hi) = y_span.map_or((0.1, 1.0), |(lo, hi)| {
                let lo = lo.log10().floor();
                (10f64.powf(lo), 10f64.powf(hi.log10().ceil().max(lo + 1.0)))
            });
            let (lo, hi) = (lo * (1.0 - 1e-9), hi * (1.0 + 1e-9));
            self.draw_plot(body, x, (lo..hi).log_scale(), points.is_empty())
        } else {
            let (lo, hi) = pad(y_span.map(|(lo, hi)| (if self.y_from_zero { lo.min(0.0) } else { lo }, hi)));
            self.draw_plot(body, x, lo..hi, points.is_empty())
        }
    }

    fn draw_plot<DB, X, Y>(
        &self,
        body: &DrawingArea<DB, Shift>,
        x: X,
        y: Y,
        empty: bool,
    ) -> Result<(), DrawError<DB>>
    where
        DB: DrawingBackend,
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let (plot, legend) = body.split_horizontally(SIZE.0 - LEGEND);
        self.draw_legend(&legend)?;
        let mut chart = ChartBuilder::on(&plot)
            .margin_top(6)
            .margin_left(8)
            .margin_bottom(8)
            .margin_right(12)
            .x_label_area_size(44)
            .y_label_area_size(68)
            .build_cartesian_2d(x, y)?;
        let x_fmt = |v: &f64| match &self.x {
            XAxis::Categories(cats) => cats.get(v.round().max(0.0) as usize).cloned().unwrap_or_default(),
            XAxis::Numeric => pretty(*v),
        };
        let y_fmt = |v: &f64| pretty(*v);
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .axis_desc_style((FONT, 16))
            .label_style((FONT, 15))
            .light_line_style(GRID_LIGHT)
            .bold_line_style(GRID_BOLD)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_labels(10)
            .y_labels(8)
            .max_light_lines(4)
            .draw()?;

        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|&p| self.visible(p)).collect();
            let lines = s.lines && pts.len() > 1;
            let dots = s.markers || pts.len() == 1;
            if lines {
                chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
            }
            if dots {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
        }
        let (w, h) = chart.plotting_area().dim_in_pixel();
        if empty {
            let style = TextStyle::from((FONT, 17).into_font())
                .color(&NO_DATA)
                .pos(Pos::new(HPos::Center, VPos::Center));
            chart.plotting_area().strip_coord_spec().draw(&Text::new(
                "no data",
                (w as i32 / 2, h as i32 / 2),
                style,
            ))?;
        }
        Ok(())
    }

    /// The legend, in its own column right of the plot: a line (or a dot,
    /// for dots-only series) in the series' colour, then its name.
    fn draw_legend<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), DrawError<DB>> {
        let label = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let y = 16 + 22 * i as i32;
            if s.lines {
                area.draw(&PathElement::new(vec![(4, y), (28, y)], color.stroke_width(3)))?;
            } else {
                area.draw(&Circle::new((16, y), 4, color.filled()))?;
            }
            area.draw(&Text::new(s.name.clone(), (36, y), label.clone()))?;
        }
        Ok(())
    }
}

/// An x axis of `n` categories, category `i` at x = i, with one tick under
/// each and none between (plotters' numeric axes pick their own ticks).
#[derive(Debug, Clone, Copy)]
struct CategoryAxis(usize);

impl Ranged for CategoryAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, (from, to): (i32, i32)) -> i32 {
        let frac = (v + 0.5) / self.0 as f64;
        from + (frac * f64::from(to - from)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() { Vec::new() } else { (0..self.0).map(|i| i as f64).collect() }
    }

    fn range(&self) -> std::ops::Range<f64> {
        -0.5..self.0 as f64 - 0.5
    }
}

type DrawError<DB> = DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>;

/// (min, max) of the finite values, if any.
fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| Some(acc.map_or((v, v), |(lo, hi): (f64, f64)| (lo.min(v), hi.max(v)))))
}

/// A range around `span` with a little air (or a unit range when there is
/// no data, or room around a single value).
fn pad(span: Option<(f64, f64)>) -> (f64, f64) {
    let Some((lo, hi)) = span else { return (0.0, 1.0) };
    if hi - lo < 1e-12 * lo.abs().max(1.0) {
        let d = 0.5 * lo.abs().max(1.0);
        return (lo - d, hi + d);
    }
    let d = 0.03 * (hi - lo);
    // A range starting at zero keeps its zero.
    (if lo == 0.0 { 0.0 } else { lo - d }, hi + d)
}

/// A tick label: no more digits than the value needs.
fn pretty(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-4..1e6).contains(&a) {
        return format!("{v:.0e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(pretty(0.0), "0");
        assert_eq!(pretty(10.0), "10");
        assert_eq!(pretty(0.25), "0.25");
        assert_eq!(pretty(0.001), "0.001");
        assert_eq!(pretty(1e-6), "1e-6");
        assert_eq!(pretty(2.5e7), "2e7");
        assert_eq!(pad(Some((3.0, 3.0))), (1.5, 4.5));
        assert_eq!(pad(Some((0.0, 10.0))), (0.0, 10.3));
        assert_eq!(pad(None), (0.0, 1.0));
    }

    /// The contents of the SVG's `<text>` elements.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string()))
            .collect()
    }

    #[test]
    fn charts_are_well_formed_svg_with_a_legend() {
        let mut c = Chart::new("loss <&>", "wall time (s)", "loss");
        c.subtitle = "a subtitle".into();
        c.series.push(Series::line("BSP", vec![(0.0, 2.0), (1.0, 0.5), (2.0, f64::NAN)], false));
        c.series.push(Series::line("ASP", vec![(0.5, 1.0)], false));
        let svg = c.to_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        let t = texts(&svg);
        for want in ["loss &lt;&amp;&gt;", "a subtitle", "wall time (s)", "loss", "BSP", "ASP"] {
            assert!(t.iter().any(|x| x == want), "no text `{want}` in {t:?}");
        }
        let lines = |color: &str| svg.matches(&format!("stroke=\"{color}\" stroke-width=\"2\"")).count();
        assert_eq!((lines("#1F77B4"), lines("#FF7F0E")), (1, 0), "a one-point series is a dot: {svg}");
        assert_eq!(svg.matches("<circle").count(), 1, "{svg}");
        assert!(!svg.contains("NaN"));

        c.log_y = true;
        c.x = XAxis::Categories(vec!["BSP (0)".into(), "ASP".into()]);
        let svg = c.to_svg();
        let t = texts(&svg);
        assert!(!svg.contains("NaN"));
        assert!(
            t.iter().any(|x| x == "BSP (0)") && t.iter().any(|x| x == "1"),
            "category and decade labels: {t:?}"
        );
        assert!(texts(&Chart::new("empty", "x", "y").to_svg()).iter().any(|x| x == "no data"));
    }
}
