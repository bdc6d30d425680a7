// A plain Java producer with Kafka's default partitioner: "key<TAB>value" lines from stdin to one
// topic, one "key<TAB>partition" line per acknowledged record on stdout. What a JVM application
// (or Kafka's console producer) writes, for tests/contracts/test_partitioning.py.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.Properties;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.StringSerializer;

public class KeyedProducer {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put("bootstrap.servers", args[0]);
        props.put("acks", "all");
        props.put("key.serializer", StringSerializer.class.getName());
        props.put("value.serializer", StringSerializer.class.getName());
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(props);
             BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
            String line;
            while ((line = in.readLine()) != null) {
                String[] kv = line.split("\t", 2);
                RecordMetadata meta = producer.send(new ProducerRecord<>(args[1], kv[0], kv[1])).get();
                System.out.println(kv[0] + "\t" + meta.partition());
            }
        }
    }
}
