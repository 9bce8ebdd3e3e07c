// Draws the speed-to-lead chart from the JSON the server rendered into #speed-data.
document.addEventListener("DOMContentLoaded", () => {
  const canvas = document.getElementById("speed-chart");
  const source = document.getElementById("speed-data");
  if (!canvas || !source || typeof Chart === "undefined") {
    return;
  }
  const data = JSON.parse(source.textContent);
  new Chart(canvas, {
    // Bars: a day with leads shows even when its neighbours have none.
    type: "bar",
    data: {
      labels: data.labels,
      datasets: [
        { label: "median (s)", data: data.median, backgroundColor: "#2563eb", maxBarThickness: 28 },
        { label: "90th percentile (s)", data: data.p90, backgroundColor: "#f59e0b", maxBarThickness: 28 },
      ],
    },
    options: {
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      interaction: { mode: "index", intersect: false },
      scales: { y: { beginAtZero: true, title: { display: true, text: "seconds" } } },
      plugins: {
        tooltip: {
          callbacks: { footer: (items) => `leads: ${data.leads[items[0].dataIndex]}` },
        },
      },
    },
  });
  canvas.dataset.drawn = "true";
});
